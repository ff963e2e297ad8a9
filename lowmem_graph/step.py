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

The sums are the same in another order: the gradients agree within floating-point tolerance. What a micro-batch's
output costs is the objective's (objectives.py: multiple choice, or next-token prediction): its `share` of the step's
loss (divided by the step's `norm`) goes to backward, its figures are summed over the step as tensors, unread.
"""
from __future__ import annotations

import contextlib

import torch

from . import distributed
from .nodes import autocast

LAYER_MAJOR = ("layer-major", "layer-major-host")


def step_gradients(graph, parts, total, device, placement=None, objective=None, target=None):
    """The gradients of one optimizer step over `parts`, each micro-batch's loss divided by `total` (the
    objective's `norm` of the whole step: the number of examples for multiple choice). Returns the objective's
    figures summed over the micro-batches (for multiple choice: the summed loss in fp64, the number correct and the
    summed routing share per read node), as tensors: the caller reads them once. `objective`: objectives.Choice
    when not given; `target`: the graph whose nodes the objective scores through, when `graph` is another module
    (a baseline's) or DDP's."""
    from .objectives import Choice

    objective = objective or Choice()
    schedule = placement.plan.schedule if placement is not None and placement.plan is not None else None
    module = getattr(graph, "module", graph)        # DDP's
    target = target if target is not None else module
    if schedule not in LAYER_MAJOR:
        return accumulate(graph, parts, total, device, objective, target)
    sums = layer_major(module, parts, total, device, placement, objective)   # runs the graph's forward itself ...
    if module is not graph:                         # ... so the ranks' gradients are averaged here
        ranks = distributed.current()
        for p in module.parameters():
            if p.grad is not None:
                distributed.all_sum(p.grad, ranks).div_(ranks.world)
    return sums


def accumulate(graph, parts, total, device, objective, target) -> tuple:
    """Forward and backward of every micro-batch in `parts` in turn (the micro-batch-major schedule)."""
    sums = None
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
            share, figures = objective.share(target, out, batch, total)
            share.backward()
        sums = _added(sums, figures)
    return sums


def layer_major(graph, parts, total, device, placement, objective):
    """Every micro-batch through each loaded layer group, then one backward (see the module's docstring)."""
    parts = [(batch, frozen[0] if frozen else None) for batch, frozen in parts]
    streamers = dict(zip(graph.stepped_layers(), placement.streamers))
    if any(s.checkpoint.plain for s in streamers.values()):
        raise ValueError("the layer-major schedule runs every group from its kept input: all must be checkpointed")
    groups = {name: [(g[0], g[-1] + 1) for g in s.checkpoint.groups] for name, s in streamers.items()}
    def weights():
        return [*graph.parameters(), *(t for node in graph.nodes.values()
                                       for t in (*node.model.parameters(), *node.model.buffers()))]

    with placement.kept.saved_for_backward(weights), autocast(device):
        outs = graph.forward_many(parts, groups)
    sums, losses = None, []
    for out, (batch, _) in zip(outs, parts):
        share, figures = objective.share(graph, out, batch, total)
        losses.append(share)
        sums = _added(sums, figures)
    torch.stack(losses).sum().backward()
    return sums


def _added(sums, new):
    """The figures summed element by element, each in its own dtype (the first micro-batch's as they are)."""
    return tuple(new) if sums is None else tuple(a + b for a, b in zip(sums, new))
