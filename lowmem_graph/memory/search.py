"""The budget planner's search: `--gpu-mem 6G` -> which layer groups stay on the device, which stream, micro-batch,
schedule.

Everything is computed from configs on the meta device (no download, no weights). The numbers are an
*estimate* that a GPU benchmark checks against measured peaks, so every part is exposed in `Plan.breakdown`
and every constant below says in one line why it has its value.

How a run uses the device (memory/placement.py carries it out):

* Frozen pass (model-major, once over the data set, no grad): one node at a time runs the decoder layers it
  needs (a reader: layers up to its read layer; a refiner: layers below its injection layer) with one layer's
  inference working set; embedding lookups happen on the host. Those layers are grouped like the training
  step's: resident first, the overflow streamed through the node's own slots (`Plan.frozen`). The pass is
  compute bound (a 2-layer Mistral group over 8 x 512 tokens is ~3.6 TFLOP, tens of ms, while its 225 MB copy
  takes ~9 ms at PCIe 4.0), so a prefetched stream hides behind compute and the largest micro-batch that fits
  wins over residency. Its peak is `Plan.frozen_pass_peak`.
* Training step: only each refiner's upper layers [inject_layer, n_layers) + final norm, the trainable
  projections and the output node. Layers are grouped; a group keeps only its input (activation checkpointing)
  and is recomputed in backward. Groups are resident in order until the budget is full; the overflow stays in a
  pinned host slab and streams through `prefetch_depth` device slots (2 = double buffered), each slot sized for
  the largest streamed group, once for forward and once for recompute + backward, per micro-batch.

The peak of a step is the plain sum of the breakdown (conservative: not every part peaks at the same instant).
"""
from __future__ import annotations

import dataclasses
import math

from ..errors import UserError
from . import budget as _budget
from .budget import _device_name, node_devices
from .estimate import (
    LAYER_MAJOR,
    LAYER_MAJOR_HOST,
    MICRO_BATCH_MAJOR,
    FrozenPlacement,
    GroupPlan,
    Plan,
    _activation_traffic,
    _step_breakdown,
    cached_on_device,
    eval_breakdown,
    host_breakdown,
)
from .profile import (
    ACT_BYTES,
    CUDA_CONTEXT,
    HEAD_PER_TOKEN,
    PARAM_BYTES,
    TRAIN_BYTES_PER_PARAM,
    _Node,
    _Profile,
    _profile,
    forward_tables,
    layer_inference,
    quant_workspace,
)
from . import cost, devices, disk
from .report import GiB, MiB
from .report import format_gib as _gib

GROUP_SIZES = (2, 3, 4)    # layers per checkpoint/stream group: one streamed copy is 225-450 MB for Mistral.
SEARCH_STEP = 64 * MiB     # the minimum is exact; the tests check that this much less is refused.


def _split(node: str, layer_bytes: list[int], first: int, last: int, size: int, cuts=()) -> list[GroupPlan]:
    """Layers [first, last) in groups of `size` (the last before a cut, or the end, may be shorter), all resident.
    A group starts at every cut: the edge runtime reads a node's stream or writes into it only between groups."""
    bounds = [first, *sorted(c for c in set(cuts) if first < c < last), last]
    return [GroupPlan(node, lo, min(lo + size, end), sum(layer_bytes[lo:min(lo + size, end)]), True)
            for start, end in zip(bounds, bounds[1:]) for lo in range(start, end, size)]


def _with_resident(groups: list[GroupPlan], k: int, keep: int = 0) -> list[GroupPlan]:
    """The first k groups resident, the overflow streamed; the first `keep` of them keep their activations (no
    recompute), the rest are checkpointed."""
    return [GroupPlan(g.node, g.first, g.last, g.bytes, i < k, i >= keep) for i, g in enumerate(groups)]


def _frozen_choices(node: _Node, micro: int, seq: int, trainable: int):
    """Every placement of a node's frozen-pass layers (group size, resident groups, slots) at this micro-batch."""
    tokens = micro * seq
    fixed = {
        "activations": (layer_inference(node, micro, seq) + 2 * tokens * node.width * ACT_BYTES
                        + forward_tables(node, micro, seq)),
        "workspace": quant_workspace(node, 0, node.needed, tokens, backward=False),
        "trainable_params": trainable * PARAM_BYTES,
        "cuda_context": CUDA_CONTEXT,
    }
    # a reader's states leave through the final norm
    norm = node.norm_bytes if node.role == "reader" or node.frozen_norm else 0
    for size in sorted({min(s, max(node.needed, 1)) for s in GROUP_SIZES}):
        base = _split(node.name, node.layer_bytes, 0, node.needed, size)
        for k in range(len(base), -1, -1):
            groups = _with_resident(base, k)
            slot = max((g.bytes for g in groups if not g.resident), default=0)
            for depth in ((0,) if k == len(base) else (2, 1)):
                yield FrozenPlacement(groups, depth, {
                    "resident_weights": sum(g.bytes for g in groups if g.resident) + norm,
                    "stream_slots": depth * slot, **fixed})


def _frozen_placement(node: _Node, micro: int, seq: int, trainable: int,
                      budget: int | None) -> FrozenPlacement | None:
    """The best placement within `budget` (None: the smallest peak): double buffered over one slot, then the
    fewest streamed bytes, then the smallest peak."""
    choices = list(_frozen_choices(node, micro, seq, trainable))
    if budget is None:
        return min(choices, key=lambda c: c.peak)
    fits = [c for c in choices if c.peak <= budget]
    return min(fits, key=lambda c: (c.prefetch_depth == 1, c.streamed_bytes, c.peak)) if fits else None


def _groups(profile: _Profile, size: int) -> list[GroupPlan]:
    return [g for node in profile.nodes.values() if node.role == "refiner"
            for g in _split(node.name, node.layer_bytes, node.inject, node.top or node.n_layers, size, node.cuts)]


def _divisors(n: int) -> list[int]:
    return [m for m in range(n, 0, -1) if n % m == 0]


def _candidates(spec, profile: _Profile, batch: int, seq: int):
    """Every (groups with residency, prefetch depth, micro-batch) choice with its breakdown."""
    refiners = [n for n in profile.nodes.values() if n.role == "refiner"]
    upper = max((n.top or n.n_layers) - n.inject for n in refiners)
    for size in sorted({min(s, upper) for s in GROUP_SIZES}):
        base = _groups(profile, size)
        for micro in _divisors(batch):
            for k in range(len(base), -1, -1):
                for keep in range(k + 1):
                    groups = _with_resident(base, k, keep)
                    for depth in ((0,) if k == len(base) else (2, 1)):
                        # streamed and accumulated: each group once for all micro-batches (all checkpointed)
                        schedules = (MICRO_BATCH_MAJOR,) + ((LAYER_MAJOR, LAYER_MAJOR_HOST)
                                                            if depth and micro < batch and not keep
                                                            and spec.train.get("objective", "choice") == "choice"
                                                            else ())
                        for schedule in schedules:
                            yield groups, depth, micro, schedule, _step_breakdown(spec, profile, groups, depth,
                                                                                  micro, seq, schedule, batch)


def with_placement(spec, plan: Plan, groups: list[GroupPlan], prefetch_depth: int, micro_batch: int,
                   schedule: str = MICRO_BATCH_MAJOR) -> Plan:
    """`plan` with other groups, residency, slots, micro-batch or schedule, its predictions recomputed (benchmarks
    and tests measure such forced placements: everything resident, everything streamed)."""
    profile = _profile(spec)
    breakdown = _step_breakdown(spec, profile, groups, prefetch_depth, micro_batch, plan.seq, schedule, plan.batch)
    activations = _activation_traffic(profile, groups, plan.batch, plan.seq) if schedule == LAYER_MAJOR_HOST else 0
    placed = dataclasses.replace(plan, groups=groups, prefetch_depth=prefetch_depth, micro_batch=micro_batch,
                                 schedule=schedule, activation_traffic=activations, breakdown=breakdown,
                                 peak=sum(breakdown.values()),
                                 eval_breakdown=eval_breakdown(profile, breakdown, micro_batch, plan.seq))
    return _timed(placed, profile, plan.device or devices.resolve(None))


def _preference(timing, groups, micro, schedule, peak):
    """Lower is better: the fastest step (memory/cost.py); on a tie the least host-to-device traffic, the larger
    micro-batch, the least recompute, the plainer schedule, the smaller peak."""
    recomputed = sum(g.last - g.first for g in groups if g.checkpointed)
    return (timing.step, timing.copied_bytes, -micro, recomputed,
            (MICRO_BATCH_MAJOR, LAYER_MAJOR, LAYER_MAJOR_HOST).index(schedule), peak)


def _timing(device, profile, groups, depth, micro, schedule, batch, seq):
    activations = _activation_traffic(profile, groups, batch, seq) if schedule == LAYER_MAJOR_HOST else 0
    return cost.step_time(device, profile, groups, depth, micro, seq, schedule, batch, activations)


def make_plan(spec, budget: int | dict[str, int], batch: int = 8, seq: int = 512, host_budget: int | None = None,
              main: str = "cuda:0", device: devices.DeviceProfile | str | None = None,
              schedules: tuple[str, ...] | None = None) -> Plan:
    """The plan for a device with `budget` bytes; UserError naming the smallest budget when none fits, or saying
    the host memory when the run would not fit `host_budget` (default: what this machine has available now).
    `device`: the device profile the times are predicted for (a DeviceProfile, a built-in name or a file; default:
    the measured profile of `main`, else a built-in one, devices.resolve). `schedules`: only these (benchmarks
    compare the best plan of each).

    Search: every group size, micro-batch (divisors of `batch`), number of resident groups and prefetch depth is
    estimated (a few hundred sums); the fastest that fits wins (see `_preference`). A choice fits when its training
    step and its evaluation (no grad, at the same micro-batch) both do. A choice's peak does not depend on the
    budget, so the smallest budget with a plan is exact: the least such peak over all choices, or the frozen pass
    at micro-batch 1, whichever is larger.
    """
    if not isinstance(device, devices.DeviceProfile):
        device = devices.resolve(device, main)
    placed = node_devices(spec, main)
    if isinstance(budget, dict) or len(set(placed.values())) > 1:
        return _plan_per_device(spec, budget, placed, _device_name(main), batch, seq, host_budget, device)
    if not isinstance(budget, int) or budget <= 0:
        raise UserError(f"the memory budget must be a positive number of bytes, got {budget!r}")
    if batch < 1 or seq < 1:
        raise UserError(f"batch and seq must be positive, got batch {batch}, seq {seq}")
    profile = _profile(spec)
    quant = spec.quant

    frozen_min = max(_frozen_placement(n, 1, seq, profile.trainable, None).peak for n in profile.nodes.values())
    fits, train_min = [], None
    for groups, depth, micro, schedule, breakdown in _candidates(spec, profile, batch, seq):
        if schedules is not None and schedule not in schedules:
            continue
        peak = sum(breakdown.values())
        evaluation = eval_breakdown(profile, breakdown, micro, seq)
        worst = max(peak, sum(evaluation.values()))
        train_min = worst if train_min is None else min(train_min, worst)
        if worst <= budget:
            timing = _timing(device, profile, groups, depth, micro, schedule, batch, seq)
            fits.append((_preference(timing, groups, micro, schedule, peak), groups, depth, micro, schedule,
                         breakdown, peak, evaluation, timing))
    if train_min is None:
        raise UserError(f"no placement of graph {spec.name!r} runs the schedules {', '.join(schedules)}")
    minimum = max(train_min, frozen_min)
    if not fits or frozen_min > budget:
        need = math.ceil(minimum / GiB * 100) / 100
        raise UserError(
            f"graph {spec.name!r} (batch {batch}, seq {seq}, {quant}) needs at least {need:.2f} GiB of device "
            f"memory ({minimum:,} bytes: training step {_gib(train_min)}, frozen pass {_gib(frozen_min)}); "
            f"the budget is {_gib(budget)}")
    fits.sort(key=lambda c: c[0])
    for frozen_micro in _divisors(batch):        # the largest micro-batch every node fits at (1 always does)
        frozen = {n.name: _frozen_placement(n, frozen_micro, seq, profile.trainable, budget)
                  for n in profile.nodes.values()}
        if all(frozen.values()):
            break
    frozen_node = max(frozen, key=lambda name: frozen[name].peak)
    available = _budget.host_available() if host_budget is None else host_budget
    # the fastest once the groups that do not fit the host are on disk (memory/disk.py), every candidate priced so
    priced = disk.Priced(fits, frozen, available, lambda c, g, f: host_breakdown(
        profile, g, f, batch, c[3], seq, spec.injection, c[4]), lambda c, g: _timing(
        device, profile, g, c[2], c[3], c[4], batch, seq))
    chosen = disk.fastest(priced)
    if chosen is None:      # the least any placement needs
        host = min((host_breakdown(profile, *disk.everything(c[1], frozen), batch, c[3], seq, spec.injection, c[4])
                    for c in fits), key=lambda h: sum(h.values()))
        parts = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in host.items())
        raise UserError(
            f"graph {spec.name!r} under a {_gib(budget)} plan needs {_gib(sum(host.values()))} of host memory "
            f"even with every layer group on disk ({parts}), but {_gib(available)} is available: close other "
            "programs, use a machine with more memory, or a smaller graph")
    (_, _, depth, micro, schedule, breakdown, peak, evaluation, _), groups, frozen, host, _ = chosen
    activations = _activation_traffic(profile, groups, batch, seq) if schedule == LAYER_MAJOR_HOST else 0
    plan = Plan(budget, batch, seq, micro, depth, groups, breakdown, peak, frozen[frozen_node].peak, minimum,
                frozen_micro, frozen_node, frozen, profile.trainable, train_min, frozen_min, schedule, activations,
                evaluation, host, available)
    return _timed(plan, profile, device, _runners_up(priced, chosen))


def _timed(plan: Plan, profile: _Profile, device, runners_up=()) -> Plan:
    """`plan` with its predicted times on `device` (memory/cost.py) and its `runners_up` (see `_runners_up`)."""
    timing = cost.step_time(device, profile, plan.groups, plan.prefetch_depth, plan.micro_batch, plan.seq,
                            plan.schedule, plan.batch, plan.activation_traffic)
    timing.eval_batch = cost.eval_time(device, profile, plan.groups, plan.prefetch_depth, plan.micro_batch,
                                       plan.seq, plan.batch)
    timing.frozen_batch = cost.frozen_time(device, profile, plan.frozen, plan.frozen_micro_batch, plan.seq,
                                           plan.batch)
    return dataclasses.replace(plan, timing=timing, device=device, runners_up=list(runners_up))


def _runners_up(priced: disk.Priced, chosen) -> list[dict]:
    """The fastest placement of each other kind that fits, RUNNERS_UP of them, fastest first, each priced as the
    chosen one is: with the reads of the groups it must put on disk (disk.Priced). A candidate's time in host
    memory bounds its time with reads, so the search stops once no later candidate can enter."""
    own = _kind(chosen[1], *chosen[0][2:5])
    best: dict[str, tuple] = {}
    for i, candidate in enumerate(priced.fits):
        top = sorted(k for k, _ in best.values())[:RUNNERS_UP]
        if len(top) == RUNNERS_UP and candidate[0] >= top[-1]:
            break
        found = priced(i)
        if found is None or found is chosen:
            continue
        kind = _kind(found[1], *candidate[2:5])
        if kind != own and (kind not in best or priced.key(found) < best[kind][0]):
            best[kind] = (priced.key(found), {"kind": kind, "timing": found[4], "peak": candidate[6]})
    return [runner for _, runner in sorted(best.values(), key=lambda b: b[0])[:RUNNERS_UP]]


RUNNERS_UP = 3      # other kinds of placement `plan` shows


def _kind(groups, depth, micro, schedule) -> str:
    """A placement in words, coarse enough that runners-up differ in what matters for time."""
    recomputed = sum(g.last - g.first for g in groups if g.checkpointed)
    layers = sum(g.last - g.first for g in groups)
    where = f"streamed through {depth} slot{'s' * (depth > 1)}" if depth else "all resident"
    return f"micro-batch {micro}, {where}, {recomputed}/{layers} layers recomputed, {schedule}"


def _plan_per_device(spec, budget, placed: dict[str, str], main: str, batch: int, seq: int,
                     host_budget: int | None, device) -> Plan:
    """Nodes on several devices (a node's `device:`), each device planned against its own budget: its nodes'
    stepped layers, their activations and (on the run's device, `main`) the trainable parts and the output node;
    one micro-batch for all, the largest every device fits. The step runs micro-batch by micro-batch."""
    budgets = budget if isinstance(budget, dict) else {d: budget for d in set(placed.values())}
    for where in sorted(set(placed.values())):
        if where not in budgets:
            names = ", ".join(n for n, d in placed.items() if d == where)
            raise UserError(f"--gpu-mem names no budget for {where}, where {names} compute{'s' * (',' not in names)}"
                            f" (give {where}=SIZE, or one size for every device)")
    if any(not isinstance(b, int) or b <= 0 for b in budgets.values()):
        raise UserError(f"every memory budget must be a positive number of bytes, got {budgets!r}")
    profile = _profile(spec)
    on = {d: [n for n in placed if placed[n] == d] for d in sorted(set(placed.values()))}
    if main not in on:
        on[main] = []
    parts = {d: dataclasses.replace(profile, nodes={n: profile.nodes[n] for n in names},
                                    trainable=profile.trainable if d == main else 0) for d, names in on.items()}
    remote = [n for name, n in profile.nodes.items() if n.role == "refiner" and placed[name] != main]
    chosen, smallest = {}, {}
    for micro in _divisors(batch):
        chosen = {d: _best_on_device(spec, part, device, batch, seq, micro, budgets.get(d, 0),
                                     smallest.setdefault(d, []),
                                     _remote_head(remote, profile.latent, micro, seq) if d == main else 0)
                  for d, part in parts.items()}
        if all(chosen.values()):
            break
    else:
        short = ", ".join(f"{d} needs {_gib(min(smallest[d]))} (budget {_gib(budgets.get(d, 0))})"
                          for d in parts if not chosen[d])
        raise UserError(f"graph {spec.name!r} (batch {batch}, seq {seq}) does not fit: {short}")
    groups = [g for name in placed for d in [placed[name]] for g in chosen[d][0] if g.node == name]
    frozen = {}
    for frozen_micro in _divisors(batch):
        frozen = {n.name: _frozen_placement(n, frozen_micro, seq, profile.trainable if placed[n.name] == main else 0,
                                            budgets[placed[n.name]]) for n in profile.nodes.values()}
        if all(frozen.values()):
            break
    if not all(frozen.values()):
        bad = next(n for n, p in frozen.items() if p is None)
        raise UserError(f"the frozen pass of {bad} does not fit {placed[bad]}'s budget {_gib(budgets[placed[bad]])}")
    frozen_node = max(frozen, key=lambda name: frozen[name].peak)
    _, depth, micro, breakdown, evaluation = chosen[main]
    host = host_breakdown(profile, groups, frozen, batch, micro, seq, spec.injection)
    available = _budget.host_available() if host_budget is None else host_budget
    if sum(host.values()) > available:
        raise UserError(f"graph {spec.name!r} needs {_gib(sum(host.values()))} of host memory, but "
                        f"{_gib(available)} is available")
    per_device = {d: {"budget": budgets[d], "peak": sum(c[3].values()), "eval_peak": sum(c[4].values()),
                      "nodes": on[d], "main": d == main} for d, c in chosen.items()}
    peak = sum(breakdown.values())
    minimum = max(min(v) for v in smallest.values() if v)
    plan = Plan(budgets[main], batch, seq, micro, max(c[1] for c in chosen.values()), groups, breakdown, peak,
                frozen[frozen_node].peak, minimum, frozen_micro, frozen_node, frozen, profile.trainable, minimum,
                minimum, MICRO_BATCH_MAJOR, 0, evaluation, host, available, per_device)
    return _timed(plan, profile, device)


def _remote_head(refiners: list[_Node], latent: int, micro: int, seq: int) -> int:
    """What the run's device holds at a step for refiners computing elsewhere: the graph's head brings each one's
    final states over in fp32 (with their gradient) and runs the readout and output node there (the latent part of
    HEAD_PER_TOKEN); that refiner's own device counts the rest of its head."""
    return sum(micro * seq * (2 * 4 * n.width + HEAD_PER_TOKEN[1] * latent) for n in refiners)


def _best_on_device(spec, part: _Profile, device, batch: int, seq: int, micro: int, budget: int, peaks: list,
                    remote_head: int = 0):
    """(groups, prefetch depth, micro, step breakdown, eval breakdown) of the best choice for one device's nodes
    at `micro`, or None; every choice's worst peak is added to `peaks`. `remote_head`: the run's device's share of
    other devices' refiners (see `_remote_head`)."""
    if not any(n.role == "refiner" for n in part.nodes.values()):   # only frozen-pass work: nothing at a step
        breakdown = {"trainable+optimizer": part.trainable * TRAIN_BYTES_PER_PARAM, "cuda_context": CUDA_CONTEXT}
        if remote_head:     # the run's device: the head, and the cached reader states (this micro-batch, the next)
            readers = (cached_on_device(MICRO_BATCH_MAJOR, micro, batch) * (seq if spec.injection == "token" else 1)
                       * 4 * sum(part.reader_widths))
            breakdown["head_activations"] = remote_head + readers
        peaks.append(sum(breakdown.values()))
        return ([], 0, micro, breakdown, dict(breakdown)) if peaks[-1] <= budget else None
    best, best_key = None, None
    for groups, depth, m, schedule, breakdown in _candidates(spec, part, batch, seq):
        if m != micro or schedule != MICRO_BATCH_MAJOR:
            continue
        breakdown = {**breakdown, "head_activations": breakdown["head_activations"] + remote_head}
        peak = sum(breakdown.values())
        evaluation = eval_breakdown(part, breakdown, micro, seq)
        peaks.append(max(peak, sum(evaluation.values())))
        if peaks[-1] <= budget:
            key = _preference(_timing(device, part, groups, depth, micro, schedule, batch, seq), groups, micro,
                              schedule, peak)
            if best_key is None or key < best_key:
                best, best_key = (groups, depth, micro, breakdown, evaluation), key
    return best
