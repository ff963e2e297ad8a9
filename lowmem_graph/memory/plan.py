"""The budget planner: `--gpu-mem 6G` -> which layer groups stay on the device, which stream, micro-batch.

Everything is computed from configs on the meta device (no download, no weights). The numbers are an
*estimate* that a GPU benchmark checks against measured peaks, so every part is exposed in `Plan.breakdown`
and every constant below says in one line why it has its value.

How a run uses the device (DESIGN.md section 2):

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

import json
import math
import re
from dataclasses import dataclass, field

from ..errors import UserError

KiB, MiB, GiB = 2 ** 10, 2 ** 20, 2 ** 30

# --- constants (each one line of why) --------------------------------------------------------------------------
# bitsandbytes NF4 with double quant, per linear weight of n params: n/2 packed bytes (two 4-bit codes per uint8),
NF4_BLOCK = 64             # one uint8 absmax per 64-weight block (blocksize=64, the bnb 4-bit default),
NF4_BLOCK2 = 256           # one fp32 second-level absmax per 256 absmax blocks (nested quantisation),
NF4_TABLES = 16 * 4 + 256 * 4 + 4   # the 16-entry NF4 code, the 256-entry nested code (fp32) and the fp32 offset.
SMALL_BYTES = 2            # norms, biases and other small parameters stay bf16 (the compute dtype) under NF4.
QUANT_BYTES = {"bf16": 2, "fp32": 4}   # bytes per param when nothing is quantised.
ACT_BYTES = 2              # activations are bf16 under autocast.
TRAIN_BYTES_PER_PARAM = 16  # trainable fp32 param (4) + grad (4) + AdamW exp_avg and exp_avg_sq (4 + 4).
PARAM_BYTES = 4            # during the frozen pass the trainables are on the device, but no grads or AdamW states yet.
CUDA_CONTEXT = 600 * MiB   # CUDA context, cuBLAS workspace, caching-allocator slack: fixed, outside torch's count.
# Saved tensors of one decoder layer run with grad, in units of (tokens x 2 bytes), measured with
# saved_tensors_hooks on Mistral/Phi-3 layers (NF4 and bf16 alike: frozen linears save no input):
# 2 RMSNorm inputs upcast to fp32 (4d) + q, attention out, fused/rotated copies (~3d) + k, v (~3 kv) + gate, up,
# act (3 I): within 7% of the measured 70.0K (Mistral) and 55.6K (Phi-3) per token.
LAYER_SAVED = (7, 3, 3)    # (x d, x kv_dim, x intermediate)
LAYER_BACKWARD = (2, 0, 2)  # transient while one layer back-propagates: grads of h (~2d) and of the MLP (~2 I).
LSE_BYTES = 4              # SDPA (flash / memory-efficient) keeps one fp32 logsumexp per head and token: O(seq).
EAGER_SCORE_BYTES = 6      # attention soft-capping (Gemma-2) means eager attention: bf16 scores + fp32 softmax.
MASK_BYTES = 2             # the 4-D padding mask (micro_batch x 1 x seq x seq) that SDPA receives, one per node.
# Head (final norm, fp32 readout, output node) per refiner token: final norm fp32 input + bf16 output + fp32 copy +
# its grad (~14 d bytes); the latent path through projection, key norms, k/v projections, grads (~32 latent B).
HEAD_PER_TOKEN = (14, 32)  # (x d, x latent_dim) bytes
GROUP_SIZES = (2, 3, 4)    # layers per checkpoint/stream group: one streamed copy is 225-450 MB for Mistral.
SEARCH_STEP = 64 * MiB     # the minimum is exact; the tests check that this much less is refused.

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 2 ** 40}


def parse_size(text: str) -> int:
    """'24G', '24GB', '6GiB', '512M', '1.5g', '1000000' -> bytes. Units are binary (G = 2**30)."""
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"cannot read memory size {text!r} (examples: 24G, 6GiB, 512M, 1.5g, or plain bytes)")
    number, unit, suffix = match.groups()
    if suffix and suffix.lower() == "ib" and not unit:
        raise UserError(f"cannot read memory size {text!r}: 'iB' needs a unit (KiB, MiB, GiB, TiB)")
    if not unit and "." in number:
        raise UserError(f"memory size {text!r} has a fraction of a byte (add a unit: K, M, G, T)")
    value = int(float(number) * _UNITS[unit.lower()])
    if value <= 0:
        raise UserError(f"memory size {text!r} must be positive")
    return value


@dataclass
class GroupPlan:
    node: str
    first: int          # 0-based decoder layer index
    last: int           # exclusive
    bytes: int
    resident: bool


class _Placed:
    """Bytes of `groups` by where they live: resident on the device, or streamed from the pinned host slab."""
    groups: list[GroupPlan]

    @property
    def streamed_bytes(self) -> int:
        """Bytes of the groups that live in the pinned host slab (the slab's size)."""
        return sum(g.bytes for g in self.groups if not g.resident)

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

    @property
    def accumulation(self) -> int:
        return self.batch // self.micro_batch

    @property
    def traffic_per_step(self) -> int:
        """Host-to-device bytes per optimizer step: each streamed group twice (forward, recompute) per micro-batch."""
        return 2 * self.streamed_bytes * self.accumulation


# --- sizes from the meta device ---------------------------------------------------------------------------------
def _nf4_bytes(n: int) -> int:
    blocks = math.ceil(n / NF4_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + NF4_TABLES


@dataclass
class _Node:
    name: str
    role: str
    width: int
    intermediate: int
    kv_dim: int
    heads: int
    eager: bool                 # attention soft-capping -> eager attention, O(seq^2) scores
    n_layers: int
    layer_bytes: list[int]
    layer_max_linear: list[int]  # numel of the largest linear weight per layer (its dequantised copy)
    norm_bytes: int              # the final norm
    needed: int                  # frozen pass: layers [0, needed) on the device
    inject: int                  # refiners: first trained layer


@dataclass
class _Profile:
    nodes: dict[str, _Node]
    trainable: int
    latent: int
    reader_widths: list[int]


_PROFILES: dict[str, _Profile] = {}


def _param_bytes(module, quant: str) -> tuple[int, int]:
    """(bytes, numel of the largest linear weight) of a module's parameters in the frozen weight format."""
    import torch

    total, largest = 0, 0
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            n = p.numel()
            if isinstance(sub, torch.nn.Linear) and name == "weight":
                largest = max(largest, n)
                total += _nf4_bytes(n) if quant == "nf4" else n * QUANT_BYTES[quant]
            else:
                total += n * (SMALL_BYTES if quant == "nf4" else QUANT_BYTES[quant])
    return total, largest


def _profile(spec, quant: str | None = None) -> _Profile:
    """Per node: layer sizes and shapes (meta models); trainable count (FrozenGraph on meta, as `inspect` counts)."""
    from ..summary import describe, meta_model

    quant = quant or spec.quant
    if quant not in ("nf4", "bf16", "fp32"):
        raise UserError(f"quant must be nf4, bf16 or fp32, got {quant!r}")
    key = json.dumps([spec.to_dict(), quant], sort_keys=True, default=str)
    if key in _PROFILES:
        return _PROFILES[key]
    nodes = {}
    for n in spec.nodes:
        config, model = meta_model(n.model, n.revision)
        text = config.get_text_config()
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        sizes = [_param_bytes(layer, quant) for layer in base.layers]
        layers = len(sizes)
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        if n.role == "reader":
            needed, inject = n.read_index(layers) + 1, layers
        else:
            needed = inject = n.inject_index(layers)
        norm = getattr(base, "norm", None)
        nodes[n.name] = _Node(
            n.name, n.role, text.hidden_size, getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
            kv_heads * head_dim, heads, getattr(text, "attn_logit_softcapping", None) is not None, layers,
            [b for b, _ in sizes], [m for _, m in sizes], _param_bytes(norm, quant)[0] if norm is not None else 0,
            needed, inject)
    _, parts = describe(spec)
    profile = _Profile(nodes, sum(parts.values()), spec.latent_dim,
                       [nodes[r.name].width for r in spec.readers])
    _PROFILES[key] = profile
    return profile


def layer_bytes(spec, quant: str | None = None) -> dict[str, list[int]]:
    """Per node, the device bytes of each decoder layer in the frozen weight format (spec.quant by default)."""
    return {name: list(node.layer_bytes) for name, node in _profile(spec, quant).nodes.items()}


# --- the estimate ------------------------------------------------------------------------------------------------
def _layer_activations(node: _Node, tokens: int, micro: int, seq: int, coeffs) -> int:
    cd, ckv, ci = coeffs
    dense = tokens * ACT_BYTES * (cd * node.width + ckv * node.kv_dim + ci * node.intermediate)
    attention = micro * node.heads * seq * (seq * EAGER_SCORE_BYTES if node.eager else LSE_BYTES)
    return dense + attention


def _split(node: str, layer_bytes: list[int], first: int, last: int, size: int) -> list[GroupPlan]:
    """Layers [first, last) in groups of `size` (the last may be shorter), all resident."""
    return [GroupPlan(node, lo, min(lo + size, last), sum(layer_bytes[lo:min(lo + size, last)]), True)
            for lo in range(first, last, size)]


def _with_resident(groups: list[GroupPlan], k: int) -> list[GroupPlan]:
    """The first k groups resident, the overflow streamed."""
    return [GroupPlan(g.node, g.first, g.last, g.bytes, i < k) for i, g in enumerate(groups)]


def _frozen_choices(node: _Node, micro: int, seq: int, quant: str, trainable: int):
    """Every placement of a node's frozen-pass layers (group size, resident groups, slots) at this micro-batch."""
    tokens = micro * seq
    largest = max(node.layer_max_linear[:node.needed], default=0)
    fixed = {
        "activations": (_layer_activations(node, tokens, micro, seq, LAYER_SAVED)
                        + tokens * node.width * ACT_BYTES + micro * seq * seq * MASK_BYTES),
        "workspace": largest * ACT_BYTES if quant == "nf4" else 0,
        "trainable_params": trainable * PARAM_BYTES,
        "cuda_context": CUDA_CONTEXT,
    }
    norm = node.norm_bytes if node.role == "reader" else 0     # a reader's states leave through the final norm
    for size in sorted({min(s, max(node.needed, 1)) for s in GROUP_SIZES}):
        base = _split(node.name, node.layer_bytes, 0, node.needed, size)
        for k in range(len(base), -1, -1):
            groups = _with_resident(base, k)
            slot = max((g.bytes for g in groups if not g.resident), default=0)
            for depth in ((0,) if k == len(base) else (2, 1)):
                yield FrozenPlacement(groups, depth, {
                    "resident_weights": sum(g.bytes for g in groups if g.resident) + norm,
                    "stream_slots": depth * slot, **fixed})


def _frozen_placement(node: _Node, micro: int, seq: int, quant: str, trainable: int,
                      budget: int | None) -> FrozenPlacement | None:
    """The best placement within `budget` (None: the smallest peak): double buffered over one slot, then the
    fewest streamed bytes, then the smallest peak."""
    choices = list(_frozen_choices(node, micro, seq, quant, trainable))
    if budget is None:
        return min(choices, key=lambda c: c.peak)
    fits = [c for c in choices if c.peak <= budget]
    return min(fits, key=lambda c: (c.prefetch_depth == 1, c.streamed_bytes, c.peak)) if fits else None


def _groups(profile: _Profile, size: int) -> list[GroupPlan]:
    return [g for node in profile.nodes.values() if node.role == "refiner"
            for g in _split(node.name, node.layer_bytes, node.inject, node.n_layers, size)]


def _activations(profile: _Profile, groups: list[GroupPlan], micro: int, seq: int, injection: str) -> dict[str, int]:
    tokens = micro * seq
    refiners = [n for n in profile.nodes.values() if n.role == "refiner"]
    saved, head = 0, 0
    for node in refiners:
        n_groups = sum(1 for g in groups if g.node == node.name)
        # every group's input, plus the cached injection-layer input that the blend's backward keeps
        saved += (n_groups + 1) * tokens * node.width * ACT_BYTES + micro * seq * seq * MASK_BYTES
        head += tokens * (HEAD_PER_TOKEN[0] * node.width + HEAD_PER_TOKEN[1] * profile.latent)
        if injection == "token":   # per-token reader states (fp32) and their latent, kept for the injection's backward
            head += tokens * 4 * 2 * (sum(profile.reader_widths) + profile.latent)
    recompute = 0
    for g in groups:
        node = profile.nodes[g.node]
        layer = _layer_activations(node, tokens, micro, seq, LAYER_SAVED)
        recompute = max(recompute, (g.last - g.first) * layer
                        + _layer_activations(node, tokens, micro, seq, LAYER_BACKWARD))
    return {"checkpoint_inputs": saved, "recompute": recompute, "head_activations": head}


def _divisors(n: int) -> list[int]:
    return [m for m in range(n, 0, -1) if n % m == 0]


def _candidates(spec, profile: _Profile, batch: int, seq: int):
    """Every (groups with residency, prefetch depth, micro-batch) choice with its breakdown."""
    refiners = [n for n in profile.nodes.values() if n.role == "refiner"]
    norms = sum(n.norm_bytes for n in refiners)
    trainable = profile.trainable * TRAIN_BYTES_PER_PARAM
    upper = max(n.n_layers - n.inject for n in refiners)
    sizes = sorted({min(s, upper) for s in GROUP_SIZES})
    for size in sizes:
        base = _groups(profile, size)
        workspace = 0
        if spec.quant == "nf4":
            workspace = max(max(profile.nodes[g.node].layer_max_linear[g.first:g.last]) for g in base) * ACT_BYTES
        for micro in _divisors(batch):
            acts = _activations(profile, base, micro, seq, spec.injection)
            for k in range(len(base), -1, -1):
                groups = _with_resident(base, k)
                # each refiner's streamer holds its own slots, sized for its largest streamed group
                slots_per_depth = [max((g.bytes for g in groups if g.node == n and not g.resident), default=0)
                                   for n in dict.fromkeys(g.node for g in groups)]
                for depth in ((0,) if k == len(base) else (2, 1)):
                    breakdown = {
                        "resident_weights": sum(g.bytes for g in groups if g.resident) + norms,
                        "stream_slots": sum(depth * b for b in slots_per_depth),
                        **acts,
                        "trainable+optimizer": trainable,
                        "workspace": workspace,
                        "cuda_context": CUDA_CONTEXT,
                    }
                    yield groups, depth, micro, breakdown


def _preference(groups, depth, micro, batch, peak):
    """Lower is better: stream nothing if possible; else double buffered; least PCIe traffic; big micro-batch."""
    streamed = sum(g.bytes for g in groups if not g.resident)
    return (depth == 1, 2 * streamed * (batch // micro), -micro, peak)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def make_plan(spec, budget: int, batch: int = 8, seq: int = 512) -> Plan:
    """The plan for a device with `budget` bytes; UserError naming the smallest budget when none fits.

    Search: every group size, micro-batch (divisors of `batch`), number of resident groups and prefetch depth is
    estimated (a few hundred sums); the best that fits wins (see `_preference`). A choice's peak does not depend
    on the budget, so the smallest budget with a plan is exact: the least training peak over all choices, or the
    frozen pass at micro-batch 1, whichever is larger.
    """
    if not isinstance(budget, int) or budget <= 0:
        raise UserError(f"the memory budget must be a positive number of bytes, got {budget!r}")
    if batch < 1 or seq < 1:
        raise UserError(f"batch and seq must be positive, got batch {batch}, seq {seq}")
    profile = _profile(spec)
    quant = spec.quant

    frozen_min = max(_frozen_placement(n, 1, seq, quant, profile.trainable, None).peak for n in profile.nodes.values())
    best, best_key, train_min = None, None, None
    for groups, depth, micro, breakdown in _candidates(spec, profile, batch, seq):
        peak = sum(breakdown.values())
        train_min = peak if train_min is None else min(train_min, peak)
        if peak <= budget:
            key = _preference(groups, depth, micro, batch, peak)
            if best_key is None or key < best_key:
                best, best_key = (groups, depth, micro, breakdown, peak), key
    minimum = max(train_min, frozen_min)
    if best is None or frozen_min > budget:
        need = math.ceil(minimum / GiB * 100) / 100
        raise UserError(
            f"graph {spec.name!r} (batch {batch}, seq {seq}, {quant}) needs at least {need:.2f} GiB of device "
            f"memory ({minimum:,} bytes: training step {_gib(train_min)}, frozen pass {_gib(frozen_min)}); "
            f"the budget is {_gib(budget)}")
    groups, depth, micro, breakdown, peak = best

    for frozen_micro in _divisors(batch):        # the largest micro-batch every node fits at (1 always does)
        frozen = {n.name: _frozen_placement(n, frozen_micro, seq, quant, profile.trainable, budget)
                  for n in profile.nodes.values()}
        if all(frozen.values()):
            break
    frozen_node = max(frozen, key=lambda name: frozen[name].peak)
    return Plan(budget, batch, seq, micro, depth, groups, breakdown, peak, frozen[frozen_node].peak, minimum,
                frozen_micro, frozen_node, frozen, profile.trainable, train_min, frozen_min)


# --- the table ---------------------------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB" if n >= 10 * MiB or n == 0 else f"{n / MiB:.2f} MiB"


_WHY = {
    "resident_weights": "resident layer groups + final norms",
    "stream_slots": "device slots for streamed groups",
    "checkpoint_inputs": "one saved input per group (+ cached injection input, mask)",
    "recompute": "one group recomputed in backward (SDPA, O(seq) attention)",
    "head_activations": "final states, readouts, output node (+ grads)",
    "trainable+optimizer": "fp32 params + grads + AdamW states, 16 B/param",
    "workspace": "dequantised copy of the largest NF4 linear (bf16)",
    "cuda_context": "fixed allowance: CUDA context, cuBLAS, allocator slack",
}


def format_plan(plan: Plan, spec) -> str:
    lines = [f"plan for graph {spec.name} ({spec.quant}): budget {_gib(plan.budget)}, batch {plan.batch} "
             f"(micro-batch {plan.micro_batch} x {plan.accumulation} accumulation), seq {plan.seq}"
             + (f" (the spec truncates at max_length {spec.max_length})" if plan.seq > spec.max_length else ""), ""]
    header = f"{'node':<10} {'layers':>8} {'group':>5} {'bytes':>12}  placement (layers 0-based, trained)"
    lines += [header, "-" * len(header)]
    index: dict[str, int] = {}
    for g in plan.groups:
        index[g.node] = index.get(g.node, 0) + 1
        span = f"{g.first}-{g.last - 1}" if g.last - g.first > 1 else str(g.first)
        lines.append(f"{g.node:<10} {span:>8} {index[g.node]:>5} {_mib(g.bytes):>12}  "
                     f"{'resident' if g.resident else 'streamed'}")
    streamed = plan.streamed_bytes
    lines += ["", f"resident {_mib(plan.resident_bytes)}; streamed {_mib(streamed)}"
              + (f" (pinned host slab; prefetch depth {plan.prefetch_depth}, "
                 f"{plan.traffic_per_step / 1e9:.2f} GB host-to-device per step)" if streamed else ""),
              f"trainable parameters: {plan.trainable_params:,}", "", "training step peak:"]
    for k, v in plan.breakdown.items():
        lines.append(f"  {k:<20} {_mib(v):>12}  {_WHY.get(k, '')}")
    verdict = "fits" if plan.peak <= plan.budget else "DOES NOT FIT"
    lines.append(f"  {'predicted peak':<20} {_mib(plan.peak):>12}  vs budget {_mib(plan.budget)} "
                 f"({plan.peak / plan.budget:.0%}, {verdict})")
    lines += ["", f"frozen pass (once over the data, one node at a time, micro-batch {plan.frozen_micro_batch}, "
                  "embeddings on the host):",
              f"  {'node':<10} {'layers':>8} {'resident':>12} {'streamed':>12} {'slots':>5} {'peak':>12}"]
    for name, placed in plan.frozen.items():
        last = placed.groups[-1].last if placed.groups else 0
        lines.append(f"  {name:<10} {f'0-{last - 1}' if last else '-':>8} "
                     f"{_mib(placed.resident_bytes):>12} {_mib(placed.streamed_bytes):>12} "
                     f"{placed.prefetch_depth:>5} {_mib(placed.peak):>12}")
    parts = ", ".join(f"{k} {_mib(v)}" for k, v in plan.frozen[plan.frozen_node].breakdown.items())
    lines += [f"  peak ({plan.frozen_node}): {parts} = {_mib(plan.frozen_pass_peak)}",
              (f"smallest budget with a plan: {_gib(plan.minimum)} (training step alone "
               f"{_gib(plan.minimum_training)}, frozen pass {_gib(plan.minimum_frozen)})")]
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------------------------
def cmd_plan(args) -> None:
    from ..cli import _spec_from_args

    spec = _spec_from_args(args)
    plan = make_plan(spec, parse_size(args.gpu_mem), args.batch, args.seq)
    print(format_plan(plan, spec))


def add_plan_command(subparsers):
    """Register `plan` on the CLI's subparsers (cli.py wires it in)."""
    p = subparsers.add_parser("plan", help="fit a graph to a device memory budget: residency, streaming, micro-batch "
                                           "(no download)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", help="a shipped graph: tiny (default) or paper")
    which.add_argument("--graph", help="a graph spec in YAML")
    p.add_argument("--gpu-mem", required=True, help="device memory budget: 24G, 6GiB, 512M, ... (G = 2**30 bytes)")
    p.add_argument("--batch", type=int, default=8, help="examples per optimizer step (default 8)")
    p.add_argument("--seq", type=int, default=512, help="tokens per example (default 512)")
    p.set_defaults(func=cmd_plan)
    return p
