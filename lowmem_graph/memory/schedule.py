"""The layer-major schedule: under accumulation, every micro-batch passes through a streamed group while it is
loaded (FlexGen's zig-zag, applied to training).

The default loop (`train.accumulate`) runs each micro-batch's forward and backward in turn, so every streamed group
crosses the bus twice per micro-batch: accumulation x 2 x the streamed bytes per step. Here:

1. each micro-batch's injection runs without grad, and the refiners' upper layers only record the calls the
   model's own loop makes (masks, rotary tables: `GroupCheckpoint.record`);
2. forward, group by group (each loaded once), every micro-batch through it; each group's inputs are kept;
3. the head of each micro-batch (final norm, readout, output node, loss) and its backward down to the refiners'
   last outputs;
4. backward, group by group in reverse (each loaded once more), every micro-batch recomputed from its kept input
   and back-propagated;
5. each micro-batch's injection recomputed with grad and back-propagated into the projections.

So each streamed group crosses the bus twice per step, whatever the accumulation. The kept inputs and gradients
stay on the device where the plan has room ("layer-major"), else in pinned host memory, moved by asynchronous
copies ordered on the compute stream ("layer-major-host"). The sums are those of the default loop in another
order: the gradients agree within floating-point tolerance.
"""
from __future__ import annotations

import torch

from .stream import page_locked_empty


class Kept:
    """What a layer-major step keeps between its phases: on the device, or in host memory (pinned on CUDA), copied
    without blocking the host, on the compute stream (after the op that made it, before the op that reads it)."""

    def __init__(self, device, on_host: bool):
        self.device = torch.device(device)
        self.on_host = on_host
        self.fetched = 0        # bytes brought back to the device (host-to-device traffic of activations)

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        if not self.on_host:
            return t
        host = page_locked_empty(t.shape, t.dtype) if self.device.type == "cuda" else torch.empty(t.shape, dtype=t.dtype)
        return host.copy_(t, non_blocking=True)

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        if not self.on_host:
            return t
        self.fetched += t.nbytes
        return t.to(self.device, non_blocking=True)


def layer_major_step(graph, parts, total: int, device, streamers, kept: Kept):
    """Forward and backward of every micro-batch in `parts` ((batch, (reader states, prefixes)) from the prefix
    cache), gradients summed as for one batch of `total`; `streamers` place each refiner's upper layers (one per
    refiner, in order); `kept` holds what is kept between phases. Returns what `train.accumulate` does: the summed
    loss (fp64), the number correct and the summed routing share per refiner, as tensors."""
    from ..graph import autocast

    parts = list(parts)
    refiners = list(zip(graph.refiners, streamers))
    if any(s.checkpoint.plain for s in streamers):
        raise ValueError("the layer-major schedule runs every group from a kept input: all must be checkpointed")
    calls = {j: [] for j in graph.refiners}         # per micro-batch: the layer calls the model's loop made
    inputs = {j: [] for j in graph.refiners}        # inputs[j][g][m]: group g's input for micro-batch m
    with torch.no_grad():
        for batch, (readers, prefixes) in parts:
            for j, streamer in refiners:
                ids, mask = batch.tokens[j]
                with streamer.checkpoint.record() as record:
                    graph.nodes[j].run(ids, mask, inject=graph.injection(j, readers, batch), prefix=prefixes[j])
                (injected, layer_calls), = record
                calls[j].append(layer_calls)
                inputs[j].append(kept.keep(injected))
    for j in inputs:
        inputs[j] = [inputs[j]]

    with autocast(device):              # grad on, inputs without: nothing is recorded, and the streamer
        for j, streamer in refiners:    # knows a backward pass follows
            groups = streamer.checkpoint
            for g in range(len(groups.groups)):
                streamer.load_group(g, backward=False)
                inputs[j].append([kept.keep(groups.run_group(g, c, kept.fetch(x)))
                                  for x, c in zip(inputs[j][g], calls[j])])

    loss_sum = correct = routing = 0
    grads = {j: [] for j in graph.refiners}         # d loss / d (each refiner's last output), per micro-batch
    for m, (batch, _) in enumerate(parts):
        tops = [kept.fetch(inputs[j][-1][m]).requires_grad_() for j in graph.refiners]
        with autocast(device):
            out = graph.head([graph.nodes[j].base.norm(t) for j, t in zip(graph.refiners, tops)], batch)
        labels = batch.labels.to(out.logits.device)
        loss = torch.nn.functional.cross_entropy(out.logits.float(), labels, reduction="sum")
        (loss / total).backward()
        for j, t in zip(graph.refiners, tops):
            grads[j].append(kept.keep(t.grad))
        loss_sum = loss_sum + loss.detach().double()
        correct = correct + (out.logits.argmax(-1) == labels).sum()
        routing = routing + out.routing.detach().float().sum(0)

    for j, streamer in refiners:
        groups = streamer.checkpoint
        for g in reversed(range(len(groups.groups))):
            streamer.load_group(g, backward=True)
            inputs[j][g + 1] = None
            new = []
            for x, c, grad in zip(inputs[j][g], calls[j], grads[j]):
                x = kept.fetch(x).requires_grad_()
                with autocast(device):
                    y = groups.run_group(g, c, x)
                torch.autograd.backward(y, kept.fetch(grad))
                new.append(kept.keep(x.grad))
            grads[j] = new
        for (batch, (readers, prefixes)), grad in zip(parts, grads[j]):
            node = graph.nodes[j]
            with autocast(device):      # what the injection hook computed in step 1, now with grad
                injected = graph.injection(j, readers, batch)(prefixes[j].to(node.device))
            injected.backward(kept.fetch(grad).to(injected.dtype))
    return loss_sum, correct, routing
