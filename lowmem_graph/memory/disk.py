"""The disk tier's plan: which layer groups live in the node cache on disk when host memory (`--host-mem`, else what
the machine has available) cannot hold every frozen node.

A group on disk is read back whenever it is placed: a frozen-pass group once per pass over a data set when resident,
once per frozen micro-batch when streamed; a training group once per placement of the steps when resident, at
every copy when streamed (estimate.group_loads). Groups go to disk in that order, the cheapest reads first (the
largest first within a kind: fewer groups read), until the host side fits. The embeddings, final norms and
everything that is not a decoder layer stay in host memory.
"""
from __future__ import annotations

import dataclasses

# kinds of group, cheapest to keep on disk first (see the module's docstring)
FROZEN_RESIDENT, STEP_RESIDENT, FROZEN_STREAMED, STEP_STREAMED = range(4)


def spill(groups: list, frozen: dict, available: int, host_of) -> tuple[list, dict, dict[str, int]]:
    """(groups, frozen, host breakdown) with the fewest, cheapest groups on disk for which `host_of(groups, frozen)`
    (the host breakdown, estimate.host_breakdown) sums to at most `available`; with every group on disk when even
    that does not fit (the caller refuses it)."""
    groups, frozen = list(groups), dict(frozen)
    choices = [(STEP_RESIDENT if g.resident else STEP_STREAMED, -g.bytes, ("step", i)) for i, g in enumerate(groups)]
    choices += [(FROZEN_RESIDENT if g.resident else FROZEN_STREAMED, -g.bytes, (name, i))
                for name, placed in frozen.items() for i, g in enumerate(placed.groups)]
    host = host_of(groups, frozen)
    for _, _, (where, i) in sorted(choices):
        if sum(host.values()) <= available:
            break
        if where == "step":
            groups[i] = dataclasses.replace(groups[i], disk=True)
        else:
            moved = list(frozen[where].groups)
            moved[i] = dataclasses.replace(moved[i], disk=True)
            frozen[where] = dataclasses.replace(frozen[where], groups=moved)
        host = host_of(groups, frozen)
    return groups, frozen, host
