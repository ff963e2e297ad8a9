"""One optimizer step's gradients, in the schedule the memory plan chose, for every graph.

A step's micro-batches are (batch, cached) parts: the batch as the graph collated it and, when training from the
prefix cache, the frozen pass's parts for it. Two loop orders over the same forward (`EdgeGraph.forward_many`):

* micro-batch-major (the default): each micro-batch's forward and backward in turn, so every streamed layer
  group crosses the bus twice per micro-batch: accumulation x 2 x the streamed bytes per step;
* layer-major (FlexGen's zig-zag applied to training): unit by unit, each layer group is loaded once and every
  micro-batch goes through it; one backward over all the micro-batches' losses then visits the groups in reverse
  (autograd runs what was recorded last first), each loaded once more. So each streamed group crosses the bus twice
  per step, whatever the accumulation. What stays between the forward and the backward (each group's input, each
  micro-batch's head) is on the device, or in host memory under layer-major-host (memory/kept.py).

The sums are the same in another order: the gradients agree within floating-point tolerance.
"""
from __future__ import annotations

import contextlib

import torch

from . import distributed
from .graph import autocast

LAYER_MAJOR = ("layer-major", "layer-major-host")


def step_gradients(graph, parts, total: int, device, placement=None):
    """The gradients of one optimizer step over `parts`, summed as for one batch of `total` examples. Returns the
    summed loss (fp64), the number correct and the summed routing share per read node, as tensors: the caller
    reads them once."""
    schedule = placement.plan.schedule if placement is not None and placement.plan is not None else None
    if schedule not in LAYER_MAJOR:
        return accumulate(graph, parts, total, device)
    module = getattr(graph, "module", graph)        # DDP's: this schedule runs the graph's forward itself ...
    sums = layer_major(module, parts, total, device, placement)
    if module is not graph:                         # ... so the ranks' gradients are averaged here
        ranks = distributed.current()
        for p in module.parameters():
            if p.grad is not None:
                distributed.all_sum(p.grad, ranks).div_(ranks.world)
    return sums


def accumulate(graph, parts, total: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward of every micro-batch in `parts` in turn (the micro-batch-major schedule)."""
    sums = (0, 0, 0)
    parts = iter(parts)
    following = next(parts, None)
    while following is not None:
        batch, frozen = following           # the previous micro-batch's states are let go first, then the next
        following = next(parts, None)       # one's copy is queued (the host does not wait): two on the device
        # under DDP the gradients are averaged across ranks once, in the step's last backward
        sync = graph.no_sync() if following is not None and hasattr(graph, "no_sync") else contextlib.nullcontext()
        with sync:
            with autocast(device):
                out = graph(batch, *frozen)
            loss, correct, routing = choice_loss(out, batch)
            (loss / total).backward()
        sums = _added(sums, (loss, correct, routing))
    return sums


def layer_major(graph, parts, total: int, device, placement):
    """Every micro-batch through each loaded layer group, then one backward (see the module's docstring)."""
    parts = [(batch, frozen[0] if frozen else None) for batch, frozen in parts]
    streamers = dict(zip(graph.stepped_layers(), placement.streamers))
    if any(s.checkpoint.plain for s in streamers.values()):
        raise ValueError("the layer-major schedule runs every group from its kept input: all must be checkpointed")
    groups = {name: [(g[0], g[-1] + 1) for g in s.checkpoint.groups] for name, s in streamers.items()}
    weights = [*graph.parameters(), *(t for node in graph.nodes.values()
                                      for t in (*node.model.parameters(), *node.model.buffers()))]
    with placement.kept.saved_for_backward(weights), autocast(device):
        outs = graph.forward_many(parts, groups)
    sums, losses = (0, 0, 0), []
    for out, (batch, _) in zip(outs, parts):
        loss, correct, routing = choice_loss(out, batch)
        losses.append(loss / total)
        sums = _added(sums, (loss, correct, routing))
    torch.stack(losses).sum().backward()
    return sums


def choice_loss(out, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the answer slots, number correct, summed routing share per read node)."""
    labels = batch.labels.to(out.logits.device)
    loss = torch.nn.functional.cross_entropy(out.logits.float(), labels, reduction="sum")
    return loss, (out.logits.argmax(-1) == labels).sum(), out.routing.detach().float().sum(0)


def _added(sums, new):
    loss, correct, routing = new
    return sums[0] + loss.detach().double(), sums[1] + correct, sums[2] + routing
