"""Checkpointing across frozen boundaries: a group of decoder layers keeps only its input.

The model's own loop (or the graph, with the calls it recorded) still calls every layer, so per-layer arguments
stay right (e.g. Gemma-2's sliding or full mask chosen by layer index). Each layer of a group gets a hook on its
forward (hooks.py: inside torch's own hooks on the layer, which keep firing). While the hidden state needs grad,
the hook only records the layer's arguments and passes the hidden state through; the group's last layer then
runs the whole group once as one autograd node (`_Recomputed`): without grad, so the forward records no graph
inside the group, keeping only its input. Backward recomputes the group from that input with grad and the
recorded arguments (HF loops give each layer the same masks and position embeddings whatever the layers before it
returned), calling what lies inside each layer's hook (hooks attached before it, then the layer's own forward),
and back-propagates through it, as torch's reentrant checkpointing does. Non-reentrant `torch.utils.checkpoint`
gives the same gradients but records each op of the forward and routes its saved tensors through Python hooks:
slower per step on the CPU, most under the layer-major schedule (bench/results/step-one-runtime-cpu.md). Only a
group whose input needs grad runs so (else no gradient would reach it); a tensor that needs grad inside a group
(none in a frozen layer) gets its gradient in `.grad`, not from `torch.autograd.grad`.

Layer-level torch hooks run once, in the forward, on the group's input: the stream may be rewritten only before a
group's first layer (where the graph writes into a node, groups are cut). A forward hook on any layer but the
group's last sees the group's input, not that layer's output.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ..hooks import LayerHook, add_hook, hooks_of, remove_hook, split_hidden


class GroupCheckpoint:
    """Run `groups` (lists of consecutive layer indices, in order) of `layers` under checkpoint while grad flows.

    `before_group(g, backward)` is where a streamer loads group `g`'s weights. It is called right before the
    group computes in the forward (`backward=False`) and, when the group ran under checkpoint, as soon as
    backward reaches the group's output (`backward=True`): before any of the group's backward nodes run,
    not only before its recompute, because some ops keep weight references from the forward outside the
    saved tensors that checkpointing recomputes (bitsandbytes keeps a view of the packed weight).
    Without grad (or when the group's input needs none) layers run as usual, `before_group(g, False)` first.
    Installed on construction (a hook on each layer's forward, hooks.py); `detach()` (or leaving a `with` block)
    removes those hooks, whatever else is attached to the layers.
    """

    def __init__(self, layers: torch.nn.ModuleList, groups: Sequence[Sequence[int]],
                 before_group: Callable[[int, bool], None] | None = None, plain: Iterable[int] = ()):
        """`plain`: indices of groups left as they are (they keep their activations, autograd as usual)."""
        self.layers = layers
        self.groups = check_groups(groups, len(layers))
        self.plain = set(plain)
        self.before_group = before_group
        self._pending = None        # (group input, recorded layer calls) while a group is being collected
        mine = [(index, _GroupLayer(self, g, pos, index)) for g, group in enumerate(self.groups)
                if g not in self.plain for pos, index in enumerate(group)]
        taken = [i for i, _ in mine if any(isinstance(h, _GroupLayer) for h in hooks_of(layers[i]))]
        if taken:
            raise RuntimeError(f"decoder layers {taken} already run in a checkpointed group "
                               "(a second GroupCheckpoint or streamer on the same layers?)")
        self._hooks = []
        try:
            for index, hook in mine:
                add_hook(layers[index], hook)
                self._hooks.append((layers[index], hook))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for layer, hook in self._hooks:
            remove_hook(layer, hook)
        self._hooks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def _run(self, g: int, pos: int, index: int, forward, args, kwargs):
        """Layer `index` (position `pos` of group `g`) called; `forward` runs what lies inside its hook."""
        hidden, args, kwargs = split_hidden(args, kwargs)
        needs_grad = torch.is_grad_enabled() and hidden.requires_grad
        if pos == 0:
            self._pending = (hidden, []) if needs_grad else None
            if self._pending is None:
                self._before(g, False)
        if self._pending is None:
            if needs_grad:
                raise RuntimeError(f"a tensor that needs grad enters decoder layer {index}, inside layer group "
                                   f"{self.groups[g]}: start a group at layer {index}")
            return forward(hidden, *args, **kwargs)
        group_input, calls = self._pending
        if hidden is not group_input:
            raise RuntimeError(f"a hook changed the hidden state at decoder layer {index}, inside layer group "
                               f"{self.groups[g]}: start a group at layer {index}")
        calls.append((forward, args, kwargs))
        if pos < len(self.groups[g]) - 1:
            return hidden
        self._pending = None
        self._before(g, False)
        return _Recomputed.apply(lambda: self._before(g, True), calls, group_input)

    def _before(self, g: int, backward: bool) -> None:
        if self.before_group is not None:
            self.before_group(g, backward)


class _Recomputed(torch.autograd.Function):
    """A group's forward without a graph, keeping its input; its backward reloads the group (`reload`), recomputes
    it from that input under the forward's autocast and back-propagates through it. Saved-tensor hooks set around
    the forward (layer-major-host's) see the input alone; any set around the backward would see the recompute's."""

    @staticmethod
    def forward(ctx, reload, calls, hidden):
        kind = hidden.device.type
        ctx.reload, ctx.calls = reload, calls
        ctx.autocast = kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind)
        ctx.save_for_backward(hidden)
        return _run_group(calls, hidden)

    @staticmethod
    def backward(ctx, grad):
        ctx.reload()
        hidden = ctx.saved_tensors[0].detach().requires_grad_()
        kind, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            out = torch.autograd.graph.get_gradient_edge(_run_group(ctx.calls, hidden))
        torch.autograd.backward(out, grad)     # from the output's edge: the output itself is let go first
        return None, None, hidden.grad


def _run_group(calls, hidden: torch.Tensor) -> torch.Tensor:
    for forward, args, kwargs in calls:
        hidden = forward(hidden, *args, **kwargs)
    return hidden


def check_groups(groups: Sequence[Sequence[int]], n_layers: int) -> list[list[int]]:
    """Groups as lists; each must be consecutive layers, and groups ascending and disjoint."""
    groups = [list(group) for group in groups]
    previous = -1
    for group in groups:
        if not group or group != list(range(group[0], group[0] + len(group))) or group[0] <= previous \
                or group[-1] >= n_layers:
            raise ValueError(f"layer groups must be non-empty runs of consecutive layers in 0..{n_layers - 1}, "
                             f"ascending and disjoint; got {groups}")
        previous = group[-1]
    return groups


class _GroupLayer(LayerHook):
    """GroupCheckpoint's hook on one layer's forward."""

    exclusive = True

    def __init__(self, owner: GroupCheckpoint, g: int, pos: int, index: int):
        self.owner, self.g, self.pos, self.index = owner, g, pos, index

    def new_forward(self, module, inner, *args, **kwargs):
        return self.owner._run(self.g, self.pos, self.index, inner, args, kwargs)
