"""The peaks of one placement: a training step's (part by part), evaluation's, the host's; the plan's types.

Given a node profile (profile.py), layer groups with their residency (search.py chooses them), a micro-batch and a
schedule, each part of the peak is a plain sum, and the peak their sum (conservative: not every part peaks at the
same instant). Every part is exposed in `Plan.breakdown` so a GPU benchmark can check it against measured peaks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .profile import (
    ACT_BYTES,
    CUDA_CONTEXT,
    HEAD_PER_TOKEN,
    TRAIN_BYTES_PER_PARAM,
    _Node,
    _Profile,
    forward_tables,
    layer_backward,
    layer_inference,
    layer_saved,
    quant_workspace,
)
from .report import GiB, MiB

# Host memory under a plan (every node lives there; the device holds what the plan moves):
HOST_RUNTIME = 2 * GiB     # Python, torch, transformers, the CUDA libraries' host side: 0.45 GiB measured without CUDA.
CACHE_SHARD_BYTES = 256 * MiB   # prefix-cache rows gathered for one shard, and the shard as written (twice this).
# the training schedules (step.py): micro-batch by micro-batch, or every micro-batch through a loaded group
MICRO_BATCH_MAJOR, LAYER_MAJOR, LAYER_MAJOR_HOST = "micro-batch-major", "layer-major", "layer-major-host"


@dataclass
class GroupPlan:
    node: str
    first: int          # 0-based decoder layer index
    last: int           # exclusive
    bytes: int
    resident: bool
    checkpointed: bool = True   # keeps only its input and recomputes in backward (a streamed group always does)
    disk: bool = False          # lives in the node cache on disk, not host memory (memory/disk.py chooses)


class _Placed:
    """Bytes of `groups` by where they live: resident on the device, or streamed from the pinned host slab."""
    groups: list[GroupPlan]

    @property
    def streamed_bytes(self) -> int:
        """Bytes of the groups that stream to the device (from the pinned host slab, or from disk through it)."""
        return sum(g.bytes for g in self.groups if not g.resident)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the groups that live on disk (resident ones are read once per phase, streamed ones per use)."""
        return sum(g.bytes for g in self.groups if g.disk)

    @property
    def resident_bytes(self) -> int:
        return sum(g.bytes for g in self.groups if g.resident)


@dataclass
class FrozenPlacement(_Placed):
    """One node in the frozen pass: its needed layers [0, needed) in groups, resident first, the rest streamed."""
    groups: list[GroupPlan]
    prefetch_depth: int                     # device slots for its streamed groups (0: none streamed)
    breakdown: dict[str, int]               # parts of its peak

    @property
    def peak(self) -> int:
        return sum(self.breakdown.values())


@dataclass
class Plan(_Placed):
    budget: int
    batch: int
    seq: int
    micro_batch: int
    prefetch_depth: int                     # device slots for streamed groups: 2 double buffered, 1, 0 = none streamed
    groups: list[GroupPlan]                 # the training-time refiner upper-layer groups, in execution order
    breakdown: dict[str, int]               # parts of a training step's peak
    peak: int                               # sum of breakdown
    frozen_pass_peak: int                   # the model-major frozen pass: its largest node's peak
    minimum: int                            # smallest budget for which a plan exists
    frozen_micro_batch: int = 1
    frozen_node: str = ""                   # the node whose frozen pass peaks
    frozen: dict[str, FrozenPlacement] = field(default_factory=dict)   # per node, in the frozen pass
    trainable_params: int = 0
    minimum_training: int = 0               # the smallest training-step peak over all choices
    minimum_frozen: int = 0                 # the frozen pass at micro-batch 1
    schedule: str = "micro-batch-major"     # or "layer-major"(-host): every micro-batch through a loaded group
    activation_traffic: int = 0             # layer-major-host: kept activations fetched back per step
    eval_breakdown: dict[str, int] = field(default_factory=dict)   # evaluation at the plan's micro-batch
    host_breakdown: dict[str, int] = field(default_factory=dict)   # host memory the run needs
    host_available: int = 0                 # what the machine had available when planned (or was told)
    devices: dict[str, dict] = field(default_factory=dict)   # nodes on several devices: each one's budget and peaks
    timing: object = None                   # predicted seconds (cost.Timing) on `device`
    device: object = None                   # the devices.DeviceProfile the times are predicted for
    runners_up: list = field(default_factory=list)   # the best other kinds of placement that fit, and their times

    @property
    def eval_peak(self) -> int:
        return sum(self.eval_breakdown.values())

    @property
    def host_peak(self) -> int:
        return sum(self.host_breakdown.values())

    @property
    def accumulation(self) -> int:
        return self.batch // self.micro_batch

    @property
    def disk_per_step(self) -> int:
        """Bytes read from disk per optimizer step: the streamed groups on disk, each time it is copied."""
        forward, backward = group_loads(self.groups, self.prefetch_depth, disk=True)
        once = sum(forward) + sum(backward)
        return once * self.accumulation if self.schedule == MICRO_BATCH_MAJOR else once

    @property
    def traffic_per_step(self) -> int:
        """Host-to-device bytes per optimizer step (see `traffic`)."""
        return traffic(self.groups, self.prefetch_depth, self.schedule, self.accumulation, self.activation_traffic)


def _kept_tensors(n_groups: int) -> int:
    """Tensors the layer-major schedule keeps of one refiner per micro-batch: every group boundary (n + 1) and,
    during the backward, the gradients at two boundaries (the one coming in, the one going out)."""
    return n_groups + 3


def _kept_bytes(node: _Node, n_groups: int, batch: int, seq: int) -> int:
    """What the layer-major schedule keeps of one refiner for the whole batch."""
    return _kept_tensors(n_groups) * batch * seq * node.width * ACT_BYTES


def _activation_traffic(profile: _Profile, groups: list[GroupPlan], batch: int, seq: int) -> int:
    """Host-to-device bytes of a layer-major step whose kept activations live on the host: each group's inputs
    fetched in the forward, the last outputs for the head, then each group's inputs and gradients in backward."""
    total = 0
    for node in (n for n in profile.nodes.values() if n.role == "refiner"):
        n_groups = sum(1 for g in groups if g.node == node.name)
        total += (3 * n_groups + 1) * batch * seq * node.width * ACT_BYTES
    return total


def cached_on_device(schedule: str, micro: int, batch: int) -> int:
    """Examples whose cached states (injection-layer inputs, reader states) a step holds on the device at once: the
    micro-batch at work and the next one, copied ahead (the default schedule); the whole batch (layer-major)."""
    return micro * min(2, batch // micro) if schedule == MICRO_BATCH_MAJOR else batch


def _activations(profile: _Profile, groups: list[GroupPlan], micro: int, seq: int, injection: str,
                 batch: int | None = None, schedule: str = MICRO_BATCH_MAJOR) -> dict[str, int]:
    """The step's activations at `micro`, in a batch of `batch` (None: `micro`). The cached states a step starts
    from (each refiner's injection-layer input, the reader states) sit on the device: under the default schedule
    the micro-batch at work and, when accumulating, the next one (copied ahead); under the layer-major ones the whole
    batch's, which also keep every micro-batch's group inputs between phases (see `_kept_bytes`), on the device or
    (LAYER_MAJOR_HOST) in pinned host memory, and each micro-batch's recorded masks and tables on the device."""
    batch = batch or micro
    tokens = micro * seq
    cached = cached_on_device(schedule, micro, batch)
    refiners = [n for n in profile.nodes.values() if n.role == "refiner"]
    saved, head = 0, 0
    for node in refiners:
        n_groups = sum(1 for g in groups if g.node == node.name and g.checkpointed)
        # a group that is not checkpointed keeps what its layers saved, for the whole step
        saved += sum((g.last - g.first) * layer_saved(node, micro, seq) for g in groups
                     if g.node == node.name and not g.checkpointed)
        saved += cached * seq * node.width * ACT_BYTES                  # the cached injection-layer inputs
        if schedule == MICRO_BATCH_MAJOR:
            saved += n_groups * tokens * node.width * ACT_BYTES + forward_tables(node, micro, seq)
        elif schedule == LAYER_MAJOR_HOST:
            # the micro-batch at work: its group input and output, the gradient coming in and going out
            saved += 4 * tokens * node.width * ACT_BYTES + batch // micro * forward_tables(node, micro, seq)
        else:
            saved += _kept_bytes(node, n_groups, batch, seq) + batch // micro * forward_tables(node, micro, seq)
        head += tokens * (HEAD_PER_TOKEN[0] * node.width + HEAD_PER_TOKEN[1] * profile.latent)
        head += tokens * node.lm_vocab * 8         # the lm objective: fp32 logits and their gradient
        if injection == "token":   # per-token reader states (fp32) and their latent, kept for the injection's backward
            head += tokens * 4 * 2 * (sum(profile.reader_widths) + profile.latent)
    # the cached reader states (fp32) of the examples beyond the micro-batch at work (per token or pooled)
    head += (cached - micro) * (seq if injection == "token" else 1) * 4 * sum(profile.reader_widths)
    recompute = 0
    for g in groups:
        node = profile.nodes[g.node]
        recompute = max(recompute, (g.last - g.first) * layer_saved(node, micro, seq) * g.checkpointed
                        + layer_backward(node, micro, seq))
    return {"checkpoint_inputs": saved, "recompute": recompute, "head_activations": head}


def _eval_activations(profile: _Profile, micro: int, seq: int) -> int:
    """Evaluation (no grad) at `micro`: each refiner's cached injection input and final states, its fp32 readout,
    kept for the output node; one layer's working set at a time."""
    tokens = micro * seq
    refiners = [n for n in profile.nodes.values() if n.role == "refiner"]
    kept = sum(tokens * (2 * n.width * ACT_BYTES + profile.latent * 4 + n.lm_vocab * 4) for n in refiners)
    working = max(layer_inference(n, micro, seq) + tokens * n.width * ACT_BYTES + forward_tables(n, micro, seq)
                  for n in refiners)
    return kept + working


def eval_breakdown(profile: _Profile, train_breakdown: dict[str, int], micro: int, seq: int) -> dict[str, int]:
    """Evaluation's peak at `micro`, placed as the training step is (between epochs, optimizer states alive)."""
    kept = ("resident_weights", "stream_slots", "trainable+optimizer", "workspace", "cuda_context")
    return {"eval_activations": _eval_activations(profile, micro, seq),
            **{k: train_breakdown[k] for k in kept}}


def pinned_bound(nbytes: int) -> int:
    """Host memory torch's pinned allocator may hold for a tensor of at most `nbytes` that is allocated step after
    step at varying sizes (batches pad to their longest prompt): it rounds each allocation up to a power of two and
    keeps every freed block for reuse, so at worst one block of each power of two up to the largest, under twice
    that. (The streamers' slabs avoid the allocator: see stream.HostSlab.)"""
    return 2 * (1 << (nbytes - 1).bit_length()) if nbytes > 0 else 0


def host_breakdown(profile: _Profile, groups: list[GroupPlan], frozen: dict[str, FrozenPlacement], batch: int,
                   micro: int, seq: int, injection: str, schedule: str = MICRO_BATCH_MAJOR) -> dict[str, int]:
    """Host memory of a planned run: every frozen node (no lm_head); the largest pinned slab, which exists twice
    while it is built (the streamed tensors are copied in, then rebound); prefix-cache rows (a shard being written;
    the step's cached rows and the next step's, assembled ahead, pinned per micro-batch, and the next step's once
    more while they are padded, before pinning); what a layer-major-host step keeps, pinned; the runtime."""
    slabs = [sum(g.bytes for g in groups if g.node == n and not g.resident and not g.disk) for n in profile.nodes]
    slabs += [sum(g.bytes for g in placed.groups if not g.resident and not g.disk) for placed in frozen.values()]
    on_disk = sum(g.bytes for g in groups if g.disk) + sum(placed.disk_bytes for placed in frozen.values())
    refiners = [n for n in profile.nodes.values() if n.role == "refiner"]
    parts = batch // micro
    rows = ([micro * seq * ACT_BYTES * n.width for n in refiners]
            + [micro * (seq if injection == "token" else 1) * 4 * w for w in profile.reader_widths])
    host = {"frozen_nodes": sum(n.host_bytes for n in profile.nodes.values()) - on_disk,
            "slab_being_built": max(slabs, default=0),
            "prefix_cache_rows": 2 * CACHE_SHARD_BYTES + parts * (sum(rows) + 2 * sum(map(pinned_bound, rows))),
            "runtime": HOST_RUNTIME}
    # each streamer reads its streamed disk groups into two staging buffers of its pinned slab (a resident group
    # on disk goes to the device straight from the file's pages)
    staging = max([sum(2 * max((g.bytes for g in groups if g.node == n and g.disk and not g.resident), default=0)
                       for n in profile.nodes)]
                  + [2 * max((g.bytes for g in placed.groups if g.disk and not g.resident), default=0)
                     for placed in frozen.values()])
    if staging:
        host["disk_staging"] = staging
    if schedule == LAYER_MAJOR_HOST:
        host["kept_activations"] = sum(_kept_tensors(sum(1 for g in groups if g.node == n.name)) * parts
                                       * pinned_bound(micro * seq * n.width * ACT_BYTES) for n in refiners)
    return host


def _step_breakdown(spec, profile: _Profile, groups: list[GroupPlan], depth: int, micro: int, seq: int,
                    schedule: str = "micro-batch-major", batch: int | None = None) -> dict:
    """The training step's peak, part by part, for these groups (resident or streamed) at this micro-batch, in
    this schedule, in a step of `batch` examples."""
    refiners = [n for n in profile.nodes.values() if n.role == "refiner"]
    workspace = max((quant_workspace(profile.nodes[g.node], g.first, g.last, micro * seq, backward=True)
                     for g in groups), default=0)
    # each refiner's streamer holds its own slots, sized for its largest streamed group
    slots = [max((g.bytes for g in groups if g.node == n and not g.resident), default=0)
             for n in dict.fromkeys(g.node for g in groups)]
    return {
        "resident_weights": sum(g.bytes for g in groups if g.resident)
        + sum(n.norm_bytes + n.lm_vocab * n.width * ACT_BYTES for n in refiners),
        "stream_slots": sum(depth * b for b in slots),
        **_activations(profile, groups, micro, seq, spec.injection, batch, schedule),
        "trainable+optimizer": profile.trainable * TRAIN_BYTES_PER_PARAM,
        "workspace": workspace,
        "cuda_context": CUDA_CONTEXT,
    }


def group_loads(groups: list[GroupPlan], depth: int, disk: bool = False) -> tuple[list[int], list[int]]:
    """The group copies of one forward and its backward, in the steady state (a step after a step), as the
    streamers make them (stream.py): per refiner, of its n streamed groups through s slots, the forward finds the
    first s still in their slots from the last backward and loads the rest; the backward finds the last s still
    there from the forward and loads the others, down to the first: 2(n - s) copies, not 2n. (bytes of the forward's
    copies, bytes of the backward's), one entry per copy; with `disk`, only the copies of groups on disk (each one
    read from disk first)."""
    forward, backward = [], []
    for node in dict.fromkeys(g.node for g in groups):
        streamed = [g for g in groups if g.node == node and not g.resident]
        slots = min(max(depth, 1), len(streamed))
        forward += [g.bytes for g in streamed[slots:] if g.disk or not disk]
        backward += [g.bytes for g in streamed[:len(streamed) - slots] if g.disk or not disk]
    return forward, backward


def traffic(groups: list[GroupPlan], depth: int, schedule: str, accumulation: int, activations: int = 0) -> int:
    """Host-to-device bytes per optimizer step: the group copies of a forward and backward (`group_loads`), per
    micro-batch, or once for all of them under a layer-major schedule; plus, when a layer-major step keeps its
    activations on the host, fetching them back (`activations`)."""
    forward, backward = group_loads(groups, depth)
    once = sum(forward) + sum(backward)
    if schedule == MICRO_BATCH_MAJOR:
        return once * accumulation
    return once + (activations if schedule == LAYER_MAJOR_HOST else 0)
