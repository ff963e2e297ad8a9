"""The cost model: how long a placement's phases take on a device (devices.DeviceProfile), so that the planner
picks the fastest plan that fits, and `plan` says the minutes.

Per decoder layer run over `tokens` tokens: its matmuls' FLOPs at the device's GEMM rate (forward: 2 x linear
weights, as the model has them (memory/profile.py), x tokens plus attention's 4 x tokens x seq x q_dim; a frozen layer's backward computes input gradients
only, as many matmul FLOPs again and attention twice), the dequantisation of its quantised weights (every run
dequantises every weight once), and a fixed launch cost (twice in backward). A checkpointed group runs its
forward again before its backward (recompute), each of its layers called through our hooks and the group's
checkpoint (DeviceProfile.hooks, charged as launch overhead). The head (readouts, output node: 6 FLOPs per trainable parameter
and token, with weight gradients) and AdamW (OPTIMIZER_BYTES per parameter at the memory bandwidth) close a step,
with their fixed costs (MICRO_BATCH_LAUNCHES, STEP_LAUNCHES).

Copies: the group copies the streamers make (estimate.group_loads: 2(n - s) per pass, not 2n) at the pinned
host-to-device rate, and a layer-major-host step's kept activations. With two slots on a device whose copies run
on a side stream (CUDA) they overlap compute, so a phase takes the larger of the two; with one slot, or on a CPU
(plain copies), they add. Groups on disk (memory/disk.py) are read before each copy at the profile's disk rate, on
the reader thread: hidden like the copies, or added where those are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .devices import DeviceProfile
from .estimate import LAYER_MAJOR_HOST, GroupPlan, group_loads
from .profile import _Node, _Profile

OPTIMIZER_BYTES = 28       # AdamW reads param, grad, exp_avg, exp_avg_sq (fp32) and writes three of them back.
HEAD_FLOPS = 6             # per trainable parameter and token: forward 2, backward 4 (input and weight gradients).
# Fixed costs outside the decoder layers, in launch units (DeviceProfile.launch) per node of the graph: its cached
# states, injection, readout and the output node's share, per micro-batch; AdamW's per-tensor work, zeroing the
# gradients and the step's bookkeeping, per step. Fitted on the tiny graph on the CPU, where they are all there is
# (bench/bench_plan_time.py, 2026-12-05), and checked on the reduced paper graph there.
MICRO_BATCH_LAUNCHES = 8
STEP_LAUNCHES = 2
QUANTISED = ("nf4", "int8")     # formats a run dequantises (int8 is charged as NF4's dequantisation)


@dataclass
class Timing:
    """A placement's predicted seconds: a training step (its parts), an evaluation batch, a frozen-pass batch."""
    step: float
    parts: dict[str, float]           # gemm, recompute (of the gemm), dequant, launch, head+optimizer, copies, disk
    overlapped: bool                  # copies hidden behind compute (two slots, side stream)
    eval_batch: float = 0.0
    frozen_batch: float = 0.0
    copied_bytes: int = 0             # host-to-device bytes per step
    disk_bytes: int = 0               # bytes read from disk per step

    @property
    def bottleneck(self) -> str:
        """What the step waits on: the copies when they take longer than compute (or are not hidden and are the
        largest part), else the largest compute part."""
        compute = {k: v for k, v in self.parts.items() if k not in ("copies", "recompute", "disk")}
        waits = {"disk reads": self.parts.get("disk", 0.0), "host-to-device copies": self.parts["copies"]}
        slowest = max(waits, key=waits.get)
        if waits[slowest] > (sum(compute.values()) if self.overlapped else max(compute.values())):
            return slowest
        return {"gemm": "matmuls", "dequant": "NF4 dequantisation", "launch": "per-layer launch overhead",
                "head+optimizer": "head and optimizer"}[max(compute, key=compute.get)]

    def why_slower(self, best: "Timing") -> str:
        """Why this placement lost to `best`, in words: the parts that grew most, or, at the same time, what the
        tie-break looked at (traffic)."""
        if self.step <= best.step * (1 + 1e-9):
            return ("as fast; moves more" if self.copied_bytes > best.copied_bytes else "as fast; a larger micro-batch, "
                    "less recompute or a smaller peak won the tie")
        names = {"recompute": "recompute", "dequant": "dequantisation", "launch": "launch overhead",
                 "copies": "copies" + ("" if self.overlapped else " not hidden"), "head+optimizer": "head",
                 "disk": "disk reads"}
        grown = {k: self.parts.get(k, 0.0) - best.parts.get(k, 0.0) for k in names}
        if not self.overlapped and best.overlapped:
            grown["copies"] = self.parts["copies"]
        if self.overlapped and self.parts["copies"] < self.step:
            grown["copies"] = 0.0       # hidden behind compute: costs nothing
        top = sorted((k for k in grown if grown[k] > 0.005 * best.step), key=grown.get, reverse=True)[:2]
        why = ", ".join(f"+{grown[k] * 1000:,.0f} ms {names[k]}" for k in top) or "more work in all parts"
        return f"{self.step / best.step - 1:+.0%}: {why}"

    def epoch(self, examples: int, batch: int, eval_examples: int = 0) -> float:
        """An epoch of `examples` training examples and `eval_examples` evaluated (the frozen pass not included: it
        runs once, before the first epoch, and is cached)."""
        return math.ceil(examples / batch) * self.step + math.ceil(eval_examples / batch) * self.eval_batch


def layer_run(device: DeviceProfile, node: _Node, tokens: int, seq: int, backward: bool = False) -> dict[str, float]:
    """Seconds of one decoder layer run (forward, or a frozen layer's backward) over `tokens` tokens, by part."""
    rate = device.gemm.get(device.compute_dtype) or device.gemm["fp32"]
    params = node.linear_params
    attention = 4 * tokens * seq * node.q_dim
    flops = 2 * params * tokens + attention * (2 if backward else 1)
    return {"gemm": flops / rate,
            "dequant": params / device.nf4_dequant if node.quant in QUANTISED else 0.0,
            "launch": device.launch * (2 if backward else 1)}


def _add(total: dict[str, float], part: dict[str, float], times: float = 1.0) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v * times


def _phase(compute: float, copies: float, overlapped: bool, disk: float = 0.0) -> float:
    return max(compute, copies, disk) if overlapped else compute + copies + disk


def step_time(device: DeviceProfile, profile: _Profile, groups: list[GroupPlan], depth: int, micro: int, seq: int,
              schedule: str, batch: int, activation_traffic: int = 0) -> Timing:
    """A training step of `batch` examples in micro-batches of `micro`: every group forward, recomputed if
    checkpointed, backward, per micro-batch (the schedules differ in their copies only)."""
    accumulation = batch // micro
    tokens = micro * seq
    parts = {"gemm": 0.0, "recompute": 0.0, "dequant": 0.0, "launch": 0.0}
    for g in groups:
        node = profile.nodes[g.node]
        layers = g.last - g.first
        forward = layer_run(device, node, tokens, seq)
        runs = 2 if g.checkpointed else 1
        _add(parts, forward, layers * runs * accumulation)
        _add(parts, layer_run(device, node, tokens, seq, backward=True), layers * accumulation)
        parts["recompute"] += forward["gemm"] * layers * accumulation * (runs - 1)
        parts["launch"] += device.hooks * layers * accumulation * (runs - 1)
    head = HEAD_FLOPS * profile.trainable * batch * seq / (device.gemm.get(device.compute_dtype) or device.gemm["fp32"])
    fixed = device.launch * len(profile.nodes) * (MICRO_BATCH_LAUNCHES * accumulation + STEP_LAUNCHES)
    parts["head+optimizer"] = head + OPTIMIZER_BYTES * profile.trainable / device.memory + fixed
    forward_loads, backward_loads = group_loads(groups, depth)
    copied = (sum(forward_loads) + sum(backward_loads)) * (accumulation if schedule == "micro-batch-major" else 1)
    copied += activation_traffic if schedule == LAYER_MAJOR_HOST else 0
    parts["copies"] = copied / device.h2d_pinned
    read = sum(map(sum, group_loads(groups, depth, disk=True))) * (accumulation if schedule == "micro-batch-major"
                                                                     else 1)
    parts["disk"] = read / device.disk_read
    overlapped = device.copies_overlap and depth == 2
    compute = sum(v for k, v in parts.items() if k not in ("copies", "recompute", "disk"))
    return Timing(_phase(compute, parts["copies"], overlapped, parts["disk"]), parts, overlapped, copied_bytes=copied,
                  disk_bytes=read)


def eval_time(device: DeviceProfile, profile: _Profile, groups: list[GroupPlan], depth: int, micro: int, seq: int,
              batch: int) -> float:
    """An evaluation batch of `batch` examples: every group forward per micro-batch, every streamed group copied
    once per micro-batch (a pass without grad ends by fetching the first group for the next)."""
    compute = 0.0
    for g in groups:
        compute += sum(layer_run(device, profile.nodes[g.node], micro * seq, seq).values()) * (g.last - g.first)
    streamed = sum(g.bytes for g in groups if not g.resident)
    read = sum(g.bytes for g in groups if g.disk and not g.resident)
    return (batch // micro) * _phase(compute, streamed / device.h2d_pinned, device.copies_overlap and depth == 2,
                                     read / device.disk_read)


def frozen_time(device: DeviceProfile, profile: _Profile, frozen: dict, micro: int, seq: int, batch: int) -> float:
    """The frozen pass over `batch` examples: each node's needed layers forward, per micro-batch, its streamed
    groups copied (and those on disk read) once per micro-batch (`frozen`: node -> FrozenPlacement); the resident
    groups on disk are read once per pass, not counted here."""
    total = 0.0
    for name, placed in frozen.items():
        node = profile.nodes[name]
        compute = sum(layer_run(device, node, micro * seq, seq).values()) * node.needed
        read = sum(g.bytes for g in placed.groups if g.disk and not g.resident)
        total += math.ceil(batch / micro) * _phase(compute, placed.streamed_bytes / device.h2d_pinned,
                                                   device.copies_overlap and placed.prefetch_depth == 2,
                                                   read / device.disk_read)
    return total
