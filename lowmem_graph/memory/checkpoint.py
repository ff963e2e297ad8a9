"""Checkpointing across frozen boundaries: a group of decoder layers keeps only its input.

The model's own loop still calls every layer (so per-layer arguments stay right, e.g. Gemma-2's sliding or
full mask chosen by layer index). While the hidden state needs grad, each layer of a group gets a forward
that only records its arguments and passes the hidden state through; the group's last layer then runs the
whole group once under non-reentrant `torch.utils.checkpoint` (reentrant checkpointing drops gradients when
the group's input does not require grad). Backward recomputes the group from its input with the recorded
arguments (HF loops give each layer the same masks and position embeddings whatever the layers before it
returned), calling the layers' forwards directly.

Layer-level hooks run once, in the forward, on the group's input: the stream may be rewritten only before a
group's first layer (where the graph writes into a node, groups are cut). A forward hook on any layer but the
group's last sees the group's input, not that layer's output.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.utils.checkpoint import checkpoint


class GroupCheckpoint:
    """Run `groups` (lists of consecutive layer indices, in order) of `layers` under checkpoint while grad flows.

    `before_group(g, backward)` is where a streamer loads group `g`'s weights. It is called right before the
    group computes in the forward (`backward=False`) and, when the group ran under checkpoint, as soon as
    backward reaches the group's output (`backward=True`): before any of the group's backward nodes run,
    not only before its recompute, because some ops keep weight references from the forward outside the
    saved tensors that checkpointing recomputes (bitsandbytes keeps a view of the packed weight).
    Without grad (or when the group's input needs none) layers run as usual, `before_group(g, False)` first.
    Installed on construction; `detach()` (or leaving a `with` block) restores the layers' own forwards.
    """

    def __init__(self, layers: torch.nn.ModuleList, groups: Sequence[Sequence[int]],
                 before_group: Callable[[int, bool], None] | None = None, plain: Iterable[int] = ()):
        """`plain`: indices of groups left as they are (they keep their activations, autograd as usual)."""
        self.layers = layers
        self.groups = check_groups(groups, len(layers))
        self.plain = set(plain)
        self.before_group = before_group
        self._pending = None        # (group input, recorded layer calls) while a group is being collected
        taken = [i for group in self.groups for i in group if "forward" in vars(layers[i])]
        if taken:
            raise RuntimeError(f"decoder layers {taken} already have their forward replaced "
                               "(a second GroupCheckpoint or streamer on the same layers?)")
        for g, group in enumerate(self.groups):
            if g in self.plain:
                continue
            for pos, index in enumerate(group):
                layers[index].forward = self._deferred(g, pos, index, layers[index].forward)

    def detach(self) -> None:
        for g, group in enumerate(self.groups):
            if g in self.plain:
                continue
            for index in group:
                del self.layers[index].forward      # the instance attribute: the class's forward is back

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def _deferred(self, g: int, pos: int, index: int, forward):
        last = pos == len(self.groups[g]) - 1

        def run(*args, **kwargs):
            hidden, args, kwargs = _split_hidden(args, kwargs)
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
            if not last:
                return hidden
            self._pending = None
            self._before(g, False)
            out = checkpoint(_run_group, calls, group_input, use_reentrant=False)
            out.register_hook(lambda grad: self._before(g, True))
            return out

        return run

    def _before(self, g: int, backward: bool) -> None:
        if self.before_group is not None:
            self.before_group(g, backward)


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


def _split_hidden(args, kwargs):
    """(hidden state, other positional args, kwargs): HF loops pass it first, or as `hidden_states=`."""
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs
