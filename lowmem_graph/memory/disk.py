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


class Priced:
    """The candidates `fits` (as search.make_plan ranks them: their first item the preference key, whose first part is
    the step time with every group in host memory, fastest first), each priced once it has put on disk what it must,
    when first asked: `self(i)` is (candidate, groups, frozen, host breakdown, timing), or None where the candidate
    does not fit even with every group on disk. `host_of(candidate, groups, frozen)` and `time_of(candidate, groups)`
    (a cost.Timing) price one. Reads only add time, so a candidate's key in host memory bounds its priced one."""

    def __init__(self, fits: list, frozen: dict, available: int, host_of, time_of):
        self.fits, self._frozen, self._available = fits, frozen, available
        self._host_of, self._time_of, self._done = host_of, time_of, {}

    def __call__(self, i: int):
        if i not in self._done:
            candidate = self.fits[i]
            groups, placed, host = spill(candidate[1], self._frozen, self._available,
                                         lambda g, f: self._host_of(candidate, g, f))
            self._done[i] = (None if sum(host.values()) > self._available
                             else (candidate, groups, placed, host, self._time_of(candidate, groups)))
        return self._done[i]

    def key(self, priced) -> tuple:
        """A priced candidate's preference key: its step time with its reads, then the candidate's tie-breaks."""
        return (priced[4].step, *priced[0][0][1:])


def fastest(priced: Priced):
    """The fastest candidate once each has put on disk what it must (see Priced): the search stops at the first
    whose time in host memory is no better than the best found. None when none fits even with every group on disk."""
    best, best_key = None, None
    for i, candidate in enumerate(priced.fits):
        if best_key is not None and candidate[0] >= best_key:
            break
        found = priced(i)
        if found is not None and (best_key is None or priced.key(found) < best_key):
            best, best_key = found, priced.key(found)
    return best


def everything(groups: list, frozen: dict) -> tuple[list, dict]:
    """Every group on disk: what a host budget must hold at the least."""
    on_disk = [dataclasses.replace(g, disk=True) for g in groups]
    return on_disk, {n: dataclasses.replace(p, groups=everything(p.groups, {})[0]) for n, p in frozen.items()}
