"""The budget planner: `--gpu-mem 6G` -> which layer groups stay on the device, which stream, micro-batch.

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
import json
import math
import re
from dataclasses import dataclass, field

from ..errors import UserError
from ..spec import FORMATS
from ..topology import Layers, of_spec
from .report import GiB, KiB, MiB
from .report import format_mib as _mib

# --- constants (each one line of why) --------------------------------------------------------------------------
# bitsandbytes NF4 with double quant, per linear weight of n params: n/2 packed bytes (two 4-bit codes per uint8),
NF4_BLOCK = 64             # one uint8 absmax per 64-weight block (blocksize=64, the bnb 4-bit default),
NF4_BLOCK2 = 256           # one fp32 second-level absmax per 256 absmax blocks (nested quantisation),
NF4_TABLES = 16 * 4 + 256 * 4 + 4   # the 16-entry NF4 code, the 256-entry nested code (fp32) and the fp32 offset.
INT8_SCALE_BYTES = 4       # LLM.int8 (bitsandbytes): one int8 per weight and one fp32 scale per output row.
INT8_TOKEN_BYTES = 9       # LLM.int8's forward, per token and unit of its widest linear: an fp16 copy and an int8 copy
                           # of the input (3), the int32 product and its fp16 dequantisation (6). Read from the CUDA
                           # path of bitsandbytes 0.50 (its CPU path allocates less); an upper bound.
SMALL_BYTES = 2            # norms, biases and other small parameters stay bf16 (the compute dtype) when quantised.
QUANT_BYTES = {"bf16": 2, "fp32": 4}   # bytes per param when nothing is quantised.
ACT_BYTES = 2              # activations are bf16 under autocast.
TRAIN_BYTES_PER_PARAM = 16  # trainable fp32 param (4) + grad (4) + AdamW exp_avg and exp_avg_sq (4 + 4).
PARAM_BYTES = 4            # during the frozen pass the trainables are on the device, but no grads or AdamW states yet.
CUDA_CONTEXT = 600 * MiB   # CUDA context, cuBLAS workspace, caching-allocator slack: fixed, outside torch's count.
# Saved tensors of one decoder layer run with grad (what its recompute re-creates), per token in units of ACT_BYTES,
# measured with saved_tensors_hooks on the five architectures at reduced width (tests/test_plan_measured.py):
NORM_SAVED = 2             # x (d + 1) per norm in the layer: its input upcast to fp32 and its fp32 reciprocal RMS
                           # (Gemma-2 has four norms, the rest two).
ATTN_SAVED = (2, 2)        # (x q_dim, x kv_dim): rotated q and k, v, the attention output; a fused qkv projection
FUSED_QKV_SAVED = (1, 1)   # (Phi-3) keeps its whole output too.
MLP_SAVED = 3              # x intermediate: gate, up, activation.
LSE_BYTES = 4              # SDPA keeps one fp32 logsumexp per head and token: O(seq).
LAYER_MASK_BYTES = 2       # SDPA turns the boolean padding mask into the compute dtype at every call and keeps it.
EAGER_SCORE_BYTES = 8      # soft-capping (Gemma-2) means eager attention: capped bf16 scores, fp32 softmax, bf16 copy.
MASK_BYTES = {False: 1, True: 2}   # a 4-D mask (micro_batch x 1 x seq x seq) built once per forward: bool for SDPA,
                                   # additive in the compute dtype for eager attention; one per kind of layer (Gemma-2:
                                   # sliding and full).
POSITION_BYTES = 8         # int64 position ids, per position.
# One layer's backward at its peak, on top of what its forward saved: the MLP's three intermediate-wide gradients and
# the gradient of the hidden state, per token in units of ACT_BYTES (measured with `LiveBytes` on the same models).
LAYER_BACKWARD = (1, 3)    # (x d, x intermediate)
# One layer run without grad (the frozen pass, evaluation) at its peak, beyond its input and output, per token in units
# of ACT_BYTES (measured the same way): the MLP's gate, up and product (a fused gate_up projection holds one more)
# beside the residual and a norm's fp32 copy.
LAYER_INFERENCE = (2, 3)   # (x d, x intermediate)
# Head (final norm, fp32 readout, output node) per refiner token: final norm fp32 input + bf16 output + fp32 copy +
# its grad (~14 d bytes); the latent path through projection, key norms, k/v projections, grads (~32 latent B).
HEAD_PER_TOKEN = (14, 32)  # (x d, x latent_dim) bytes
# Host memory under a plan (every node lives there; the device holds what the plan moves):
HOST_RUNTIME = 2 * GiB     # Python, torch, transformers, the CUDA libraries' host side: 0.45 GiB measured without CUDA.
CACHE_SHARD_BYTES = 256 * MiB   # prefix-cache rows gathered for one shard, and the shard as written (twice this).
# the training schedules (memory/schedule.py): micro-batch by micro-batch, or every micro-batch through a loaded group
MICRO_BATCH_MAJOR, LAYER_MAJOR, LAYER_MAJOR_HOST = "micro-batch-major", "layer-major", "layer-major-host"
GROUP_SIZES = (2, 3, 4)    # layers per checkpoint/stream group: one streamed copy is 225-450 MB for Mistral.
SEARCH_STEP = 64 * MiB     # the minimum is exact; the tests check that this much less is refused.

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 2 ** 40}


def parse_size(text: str) -> int:
    """'24G', '24GB', '6GiB', '512M', '1.5g', '100B', '10000000' -> bytes. Units are binary (G = 2**30); a plain
    number under 1 MiB is refused as a forgotten unit ('24' means 24G, not 24 bytes)."""
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
    if not unit and not suffix and value < MiB:
        raise UserError(f"memory size {text!r} has no unit, so it would be {value} bytes: write {text}G for GiB "
                        f"(or {text}M)")
    return value


@dataclass
class GroupPlan:
    node: str
    first: int          # 0-based decoder layer index
    last: int           # exclusive
    bytes: int
    resident: bool
    checkpointed: bool = True   # keeps only its input and recomputes in backward (a streamed group always does)


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
    schedule: str = "micro-batch-major"     # or "layer-major"(-host): every micro-batch through a loaded group
    activation_traffic: int = 0             # layer-major-host: kept activations fetched back per step
    eval_breakdown: dict[str, int] = field(default_factory=dict)   # evaluation at the plan's micro-batch
    host_breakdown: dict[str, int] = field(default_factory=dict)   # host memory the run needs
    host_available: int = 0                 # what the machine had available when planned (or was told)
    devices: dict[str, dict] = field(default_factory=dict)   # nodes on several devices: each one's budget and peaks

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
    def traffic_per_step(self) -> int:
        """Host-to-device bytes per optimizer step (see `traffic`)."""
        return traffic(self.streamed_bytes, self.schedule, self.accumulation, self.activation_traffic)


# --- sizes from the meta device ---------------------------------------------------------------------------------
def _nf4_bytes(n: int) -> int:
    blocks = math.ceil(n / NF4_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + NF4_TABLES


def _small_bytes(quant: str) -> int:
    """Bytes per parameter of what is never quantised (norms, biases, embeddings)."""
    return QUANT_BYTES.get(quant, SMALL_BYTES)


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
    q_dim: int = 0               # heads x head_dim (the hidden width but for Gemma-2)
    head_dim: int = 0
    norms: int = 2               # norms per decoder layer (each keeps its fp32 input for backward)
    fused_qkv: bool = False      # one projection makes q, k and v (Phi-3)
    fused_mlp: bool = False      # one projection makes gate and up (Phi-3)
    masks: int = 1               # 4-D masks a forward builds: one per kind of layer (Gemma-2: sliding and full)
    quant: str = "nf4"           # the node's frozen weight format
    embedding_bytes: int = 0     # the input embedding table (bf16 under NF4), kept in host memory
    top: int = 0                 # layers [inject, top) run at a step (0: all of them)
    cuts: tuple[int, ...] = ()   # graphs given by edges: layers where a group must start (an edge writes there,
                                 # or one reads the layer below)
    frozen_norm: bool = False    # the frozen pass reads states through the final norm (edge runtime)
    lm_vocab: int = 0            # the lm objective: the vocabulary its frozen LM head predicts (0: no head)

    @property
    def host_bytes(self) -> int:
        """The whole frozen node as it sits in host memory under a plan (no lm_head: nodes give no logits)."""
        return sum(self.layer_bytes) + self.norm_bytes + self.embedding_bytes


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
                total += (_nf4_bytes(n) if quant == "nf4" else n + p.shape[0] * INT8_SCALE_BYTES if quant == "int8"
                          else n * QUANT_BYTES[quant])
            else:
                total += n * _small_bytes(quant)
    return total, largest


def _profile(spec, quant: str | None = None) -> _Profile:
    """Per node: layer sizes and shapes (meta models); the trainable count, from the widths (`trainable_count`)."""
    from ..summary import meta_model

    quant = quant or spec.quant
    if quant not in FORMATS:
        raise UserError(f"quant must be one of {', '.join(FORMATS)}, got {quant!r}")
    key = json.dumps([spec.to_dict(), quant], sort_keys=True, default=str)
    if key in _PROFILES:
        return _PROFILES[key]
    nodes = {}
    metas = {n.name: meta_model(n.model, n.revision, n.trust_remote_code) for n in spec.nodes}
    bases = {name: model.get_decoder() if hasattr(model, "get_decoder") else model.model
             for name, (_, model) in metas.items()}
    edges = _edge_layers(spec, {name: len(base.layers) for name, base in bases.items()}) if spec.by_edges else {}
    for n in spec.nodes:
        config, model = metas[n.name]
        layers = len(bases[n.name].layers)
        lm_vocab = 0
        if spec.by_edges:       # "refiner": runs at a step, from its lowest written layer up
            role, needed, inject, top, cuts, frozen_norm = edges[n.name]
            if spec.train.get("objective") == "lm" and n.name in spec.output.reads:
                lm_vocab = config.get_text_config().vocab_size
        elif n.role == "reader":
            role, (needed, inject), top, cuts, frozen_norm = n.role, (n.read_index(layers) + 1, layers), 0, (), False
        else:
            role, needed, top, cuts, frozen_norm = n.role, n.inject_index(layers), 0, (), False
            inject = needed
        nodes[n.name] = dataclasses.replace(node_profile(n.name, role, config, model, n.quant or quant, needed, inject),
                                            top=top, cuts=cuts, frozen_norm=frozen_norm, lm_vocab=lm_vocab)
    profile = _Profile(nodes, trainable_count(spec, {name: node.width for name, node in nodes.items()}),
                       spec.latent_dim,
                       [nodes[r.name].width for r in spec.readers])
    _PROFILES[key] = profile
    return profile


def _edge_layers(spec, n_layers: dict[str, int]) -> dict[str, tuple]:
    """Per node of a graph given by its edges: (role, frozen-pass layers, first layer run at a step, layers run at a
    step, group cuts, whether the frozen pass reads through the final norm), from its topology on the nodes' layers
    (`n_layers`: node -> decoder layers), checked as the edge runtime checks it."""
    layers = Layers(of_spec(spec), n_layers)
    layers.check(spec.train.get("objective", "choice"))
    stepped = layers.stepped_layers()
    out = {}
    for name, n in n_layers.items():
        parts = layers.frozen_parts(name)
        needed = max((layer + (kind != "prefix") for kind, layer in parts), default=0)
        first, top = stepped.get(name, (n, n))
        out[name] = ("refiner" if name in stepped else "reader", needed, first, top, layers.cuts(name),
                     any(kind != "prefix" for kind, _ in parts))
    return out


def output_node_params(dim: int, heads: int, max_choices: int, n_sources: int) -> int:
    """Parameters of the output node (graph.OutputNode): queries, source embeddings, key norm, multi-head
    attention (q, k, v and out projections with biases), the score."""
    return max_choices * dim + n_sources * dim + 2 * dim + 4 * dim * dim + 4 * dim + dim + 1


def trainable_count(spec, widths: dict[str, int]) -> int:
    """The graph's trainable parameters from the nodes' widths alone (what `inspect` counts on the real module,
    FrozenGraph or EdgeGraph; a test checks they agree): the maps on the edges, the bridges' gates, the readouts
    and the output node."""
    dim = spec.latent_dim
    if not spec.by_edges:       # read_proj W_k, readout W_j, and a separate carry per refiner unless tied
        total = sum(widths[r.name] * dim for r in spec.readers)
        total += sum(widths[j.name] * dim for j in spec.refiners) * (2 if spec.carry == "separate" else 1)
        return total + output_node_params(dim, spec.output.heads, spec.output.max_choices, len(spec.refiners))
    topology = of_spec(spec)
    latents, choice = topology.latents, spec.train.get("objective", "choice") == "choice"
    read = topology.reads if choice else []
    total = 0
    for e in topology.edges:
        if e.target in latents:                                 # projection into the latent
            total += widths[e.source] * latents[e.target]
        elif e.source in latents:                               # carry, unless tied to the target's readout
            tied = spec.carry == "tied" and e.target in read and latents[e.source] == dim
            total += 0 if tied else latents[e.source] * widths[e.target]
        else:                                                   # a bridge and its gate
            total += widths[e.source] * widths[e.target] + 1
    total += sum(widths[j] * dim for j in read)
    if choice:
        total += output_node_params(dim, spec.output.heads, spec.output.max_choices, len(topology.reads))
    return total


def node_profile(name: str, role: str, config, model, quant: str, needed: int, inject: int) -> _Node:
    """What the estimate needs of one node, read off its (meta) model: layer sizes in the frozen weight format,
    widths, heads, norms per layer, fused projections, whether its attention is eager."""
    import torch

    text = config.get_text_config()
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    sizes = [_param_bytes(layer, quant) for layer in base.layers]
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    norm = getattr(base, "norm", None)
    table = base.get_input_embeddings().weight
    layer = base.layers[0]
    outputs = {m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    return _Node(name, role, text.hidden_size, intermediate, kv_heads * head_dim, heads,
                 getattr(text, "attn_logit_softcapping", None) is not None,
                 len(sizes), [b for b, _ in sizes], [m for _, m in sizes],
                 _param_bytes(norm, quant)[0] if norm is not None else 0, needed, inject, heads * head_dim, head_dim,
                 sum(1 for m in layer.modules() if "norm" in type(m).__name__.lower()),
                 heads * head_dim + 2 * kv_heads * head_dim in outputs, 2 * intermediate in outputs,
                 len(set(getattr(text, "layer_types", None) or ["full"])), quant,
                 table.numel() * _small_bytes(quant))


def layer_bytes(spec, quant: str | None = None) -> dict[str, list[int]]:
    """Per node, the device bytes of each decoder layer in the frozen weight format (spec.quant by default)."""
    return {name: list(node.layer_bytes) for name, node in _profile(spec, quant).nodes.items()}


# --- the estimate ------------------------------------------------------------------------------------------------
def layer_saved(node: _Node, micro: int, seq: int) -> int:
    """Bytes autograd keeps for one decoder layer run with grad: what a checkpointed group's recompute re-creates."""
    attention = ATTN_SAVED[0] * node.q_dim + ATTN_SAVED[1] * node.kv_dim
    if node.fused_qkv:
        attention += FUSED_QKV_SAVED[0] * node.q_dim + FUSED_QKV_SAVED[1] * node.kv_dim
    dense = micro * seq * ACT_BYTES * (NORM_SAVED * node.norms * (node.width + 1) + attention
                                      + MLP_SAVED * node.intermediate)
    if node.eager:
        return dense + micro * node.heads * seq * seq * EAGER_SCORE_BYTES
    return dense + micro * node.heads * seq * LSE_BYTES + micro * seq * seq * LAYER_MASK_BYTES


def layer_backward(node: _Node, micro: int, seq: int) -> int:
    """Bytes one layer's backward allocates at its peak, on top of what its forward saved."""
    return micro * seq * ACT_BYTES * (LAYER_BACKWARD[0] * node.width + LAYER_BACKWARD[1] * node.intermediate)


def layer_inference(node: _Node, micro: int, seq: int) -> int:
    """Bytes one layer run without grad allocates at its peak, beyond its input and output."""
    dense = micro * seq * ACT_BYTES * (LAYER_INFERENCE[0] * node.width
                                      + (LAYER_INFERENCE[1] + node.fused_mlp) * node.intermediate)
    if node.eager:
        return dense + micro * node.heads * seq * seq * EAGER_SCORE_BYTES
    return dense + micro * seq * seq * LAYER_MASK_BYTES


def forward_tables(node: _Node, micro: int, seq: int) -> int:
    """What one forward of a node builds once for all its layers: 4-D masks, rotary cos/sin tables, positions."""
    return (node.masks * micro * seq * seq * MASK_BYTES[node.eager] + 2 * seq * node.head_dim * ACT_BYTES
            + seq * POSITION_BYTES)


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


def quant_workspace(node: _Node, first: int, last: int, tokens: int, backward: bool) -> int:
    """Transient bytes of the frozen format's matmuls in layers [first, last): NF4 dequantises one weight at a time
    (bf16); LLM.int8 quantises each input and dequantises its product, and its backward dequantises the weight."""
    largest = max(node.layer_max_linear[first:last], default=0) * ACT_BYTES
    if node.quant == "nf4":
        return largest
    if node.quant == "int8":
        widest = max(node.width, node.intermediate * (2 if node.fused_mlp else 1),
                     node.q_dim + 2 * node.kv_dim if node.fused_qkv else 0)
        return tokens * INT8_TOKEN_BYTES * widest + (largest if backward else 0)
    return 0


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
    slabs = [sum(g.bytes for g in groups if g.node == n and not g.resident) for n in profile.nodes]
    slabs += [placed.streamed_bytes for placed in frozen.values()]
    refiners = [n for n in profile.nodes.values() if n.role == "refiner"]
    parts = batch // micro
    rows = ([micro * seq * ACT_BYTES * n.width for n in refiners]
            + [micro * (seq if injection == "token" else 1) * 4 * w for w in profile.reader_widths])
    host = {"frozen_nodes": sum(n.host_bytes for n in profile.nodes.values()),
            "slab_being_built": max(slabs, default=0),
            "prefix_cache_rows": 2 * CACHE_SHARD_BYTES + parts * (sum(rows) + 2 * sum(map(pinned_bound, rows))),
            "runtime": HOST_RUNTIME}
    if schedule == LAYER_MAJOR_HOST:
        host["kept_activations"] = sum(_kept_tensors(sum(1 for g in groups if g.node == n.name)) * parts
                                       * pinned_bound(micro * seq * n.width * ACT_BYTES) for n in refiners)
    return host


def host_available() -> int:
    """Host memory this machine has available now (psutil): what a plan's host figure is checked against."""
    import psutil

    return int(psutil.virtual_memory().available)


def device_needs(plan: Plan, main: str) -> dict[str, int]:
    """The most each device of the plan must hold at once: training step, evaluation, the frozen pass of its nodes."""
    if not plan.devices:
        return {main: max(plan.peak, plan.eval_peak, plan.frozen_pass_peak)}
    return {d: max([v["peak"], v["eval_peak"]] + [plan.frozen[n].peak for n in v["nodes"] if plan.frozen.get(n)])
            for d, v in plan.devices.items()}


def check_device_room(plan: Plan, main: str) -> None:
    """Refuse, before anything loads, a plan that a CUDA device cannot hold for what other programs use of it (a
    desktop, another run): the budget says what the run may take, not what is free. The plan's context allowance
    is set against the context this process has made by now, so only a certain shortfall is refused."""
    import torch

    for device, need in device_needs(plan, main).items():
        if not device.startswith("cuda"):
            continue
        free, total = torch.cuda.mem_get_info(torch.device(device))
        free += torch.cuda.memory_reserved(torch.device(device))    # this process's own cached blocks (an earlier run)
        if need - CUDA_CONTEXT > free:
            room = (free + CUDA_CONTEXT) // (GiB // 10) / 10
            raise UserError(f"the plan needs up to {_gib(need)} on {device}, but only {_gib(free)} of its "
                            f"{_gib(total)} is free (other programs hold the rest): close them, or plan for what "
                            f"is left with --gpu-mem {room:.1f}G")


def _divisors(n: int) -> list[int]:
    return [m for m in range(n, 0, -1) if n % m == 0]


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
                        # (the edge runtime steps its nodes in lockstep, micro-batch by micro-batch)
                        schedules = (MICRO_BATCH_MAJOR,) + ((LAYER_MAJOR, LAYER_MAJOR_HOST)
                                                            if depth and micro < batch and not keep
                                                            and not spec.by_edges else ())
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
    return dataclasses.replace(plan, groups=groups, prefetch_depth=prefetch_depth, micro_batch=micro_batch,
                               schedule=schedule, activation_traffic=activations, breakdown=breakdown,
                               peak=sum(breakdown.values()),
                               eval_breakdown=eval_breakdown(profile, breakdown, micro_batch, plan.seq))


def traffic(streamed: int, schedule: str, accumulation: int, activations: int = 0) -> int:
    """Host-to-device bytes per optimizer step: each streamed group twice (forward, then recompute and backward),
    per micro-batch, or once for all of them under a layer-major schedule; plus, when a layer-major step keeps
    its activations on the host, fetching them back (`activations`)."""
    if schedule == MICRO_BATCH_MAJOR:
        return 2 * streamed * accumulation
    return 2 * streamed + (activations if schedule == LAYER_MAJOR_HOST else 0)


def _preference(profile, groups, depth, micro, schedule, batch, seq, peak):
    """Lower is better: stream nothing if possible; else double buffered; least PCIe traffic; big micro-batch;
    least recompute (a group that keeps its activations is not run twice); the plainer schedule on a tie."""
    streamed = sum(g.bytes for g in groups if not g.resident)
    moved = traffic(streamed, schedule, batch // micro, _activation_traffic(profile, groups, batch, seq)
                    if schedule == LAYER_MAJOR_HOST else 0)
    recomputed = sum(g.last - g.first for g in groups if g.checkpointed)
    return (depth == 1, moved, -micro, recomputed, (MICRO_BATCH_MAJOR, LAYER_MAJOR, LAYER_MAJOR_HOST).index(schedule),
            peak)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_budgets(text: str) -> int | dict[str, int]:
    """`--gpu-mem`: one size for every device ("24G"), or a size per device ("cuda:0=24G,cuda:1=12G")."""
    if "=" not in text:
        return parse_size(text)
    budgets = {}
    for part in text.split(","):
        device, _, size = part.strip().partition("=")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device.strip()):
            raise UserError(f"--gpu-mem {text}: {device!r} is not a device (cpu, cuda or cuda:N)")
        budgets[_device_name(device.strip())] = parse_size(size.strip())
    return budgets


def _device_name(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def node_devices(spec, main: str = "cuda:0") -> dict[str, str]:
    """Node -> the device it computes on: its spec's `device`, else the run's (`main`)."""
    return {n.name: _device_name(n.device) if n.device else _device_name(main) for n in spec.nodes}


def make_plan(spec, budget: int | dict[str, int], batch: int = 8, seq: int = 512, host_budget: int | None = None,
              main: str = "cuda:0") -> Plan:
    """The plan for a device with `budget` bytes; UserError naming the smallest budget when none fits, or saying
    the host memory when the run would not fit `host_budget` (default: what this machine has available now).

    Search: every group size, micro-batch (divisors of `batch`), number of resident groups and prefetch depth is
    estimated (a few hundred sums); the best that fits wins (see `_preference`). A choice fits when its training
    step and its evaluation (no grad, at the same micro-batch) both do. A choice's peak does not depend on the
    budget, so the smallest budget with a plan is exact: the least such peak over all choices, or the frozen pass
    at micro-batch 1, whichever is larger.
    """
    devices = node_devices(spec, main)
    if isinstance(budget, dict) or len(set(devices.values())) > 1:
        return _plan_per_device(spec, budget, devices, _device_name(main), batch, seq, host_budget)
    if not isinstance(budget, int) or budget <= 0:
        raise UserError(f"the memory budget must be a positive number of bytes, got {budget!r}")
    if batch < 1 or seq < 1:
        raise UserError(f"batch and seq must be positive, got batch {batch}, seq {seq}")
    profile = _profile(spec)
    quant = spec.quant

    frozen_min = max(_frozen_placement(n, 1, seq, profile.trainable, None).peak for n in profile.nodes.values())
    best, best_key, train_min = None, None, None
    for groups, depth, micro, schedule, breakdown in _candidates(spec, profile, batch, seq):
        peak = sum(breakdown.values())
        evaluation = eval_breakdown(profile, breakdown, micro, seq)
        worst = max(peak, sum(evaluation.values()))
        train_min = worst if train_min is None else min(train_min, worst)
        if worst <= budget:
            key = _preference(profile, groups, depth, micro, schedule, batch, seq, peak)
            if best_key is None or key < best_key:
                best, best_key = (groups, depth, micro, schedule, breakdown, peak, evaluation), key
    minimum = max(train_min, frozen_min)
    if best is None or frozen_min > budget:
        need = math.ceil(minimum / GiB * 100) / 100
        raise UserError(
            f"graph {spec.name!r} (batch {batch}, seq {seq}, {quant}) needs at least {need:.2f} GiB of device "
            f"memory ({minimum:,} bytes: training step {_gib(train_min)}, frozen pass {_gib(frozen_min)}); "
            f"the budget is {_gib(budget)}")
    groups, depth, micro, schedule, breakdown, peak, evaluation = best

    for frozen_micro in _divisors(batch):        # the largest micro-batch every node fits at (1 always does)
        frozen = {n.name: _frozen_placement(n, frozen_micro, seq, profile.trainable, budget)
                  for n in profile.nodes.values()}
        if all(frozen.values()):
            break
    frozen_node = max(frozen, key=lambda name: frozen[name].peak)
    host = host_breakdown(profile, groups, frozen, batch, micro, seq, spec.injection, schedule)
    activations = _activation_traffic(profile, groups, batch, seq) if schedule == LAYER_MAJOR_HOST else 0
    available = host_available() if host_budget is None else host_budget
    if sum(host.values()) > available:
        parts = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in host.items())
        raise UserError(
            f"graph {spec.name!r} under a {_gib(budget)} plan needs {_gib(sum(host.values()))} of host memory "
            f"({parts}), but {_gib(available)} is available: close other programs, use a machine with more "
            "memory, or a smaller graph")
    return Plan(budget, batch, seq, micro, depth, groups, breakdown, peak, frozen[frozen_node].peak, minimum,
                frozen_micro, frozen_node, frozen, profile.trainable, train_min, frozen_min, schedule, activations,
                evaluation, host, available)


def _plan_per_device(spec, budget, devices: dict[str, str], main: str, batch: int, seq: int,
                     host_budget: int | None) -> Plan:
    """Nodes on several devices (a node's `device:`), each device planned against its own budget: its nodes'
    stepped layers, their activations and (on the run's device, `main`) the trainable parts and the output node;
    one micro-batch for all, the largest every device fits. The step runs micro-batch by micro-batch."""
    budgets = budget if isinstance(budget, dict) else {d: budget for d in set(devices.values())}
    for device in sorted(set(devices.values())):
        if device not in budgets:
            names = ", ".join(n for n, d in devices.items() if d == device)
            raise UserError(f"--gpu-mem names no budget for {device}, where {names} compute{'s' * (',' not in names)}"
                            f" (give {device}=SIZE, or one size for every device)")
    if any(not isinstance(b, int) or b <= 0 for b in budgets.values()):
        raise UserError(f"every memory budget must be a positive number of bytes, got {budgets!r}")
    profile = _profile(spec)
    on = {d: [n for n in devices if devices[n] == d] for d in sorted(set(devices.values()))}
    if main not in on:
        on[main] = []
    parts = {d: dataclasses.replace(profile, nodes={n: profile.nodes[n] for n in names},
                                    trainable=profile.trainable if d == main else 0) for d, names in on.items()}
    remote = [n for name, n in profile.nodes.items() if n.role == "refiner" and devices[name] != main]
    chosen, smallest = {}, {}
    for micro in _divisors(batch):
        chosen = {d: _best_on_device(spec, part, batch, seq, micro, budgets.get(d, 0), smallest.setdefault(d, []),
                                     _remote_head(remote, profile.latent, micro, seq) if d == main else 0)
                  for d, part in parts.items()}
        if all(chosen.values()):
            break
    else:
        short = ", ".join(f"{d} needs {_gib(min(smallest[d]))} (budget {_gib(budgets.get(d, 0))})"
                          for d in parts if not chosen[d])
        raise UserError(f"graph {spec.name!r} (batch {batch}, seq {seq}) does not fit: {short}")
    groups = [g for name in devices for d in [devices[name]] for g in chosen[d][0] if g.node == name]
    frozen = {}
    for frozen_micro in _divisors(batch):
        frozen = {n.name: _frozen_placement(n, frozen_micro, seq, profile.trainable if devices[n.name] == main else 0,
                                            budgets[devices[n.name]]) for n in profile.nodes.values()}
        if all(frozen.values()):
            break
    if not all(frozen.values()):
        bad = next(n for n, p in frozen.items() if p is None)
        raise UserError(f"the frozen pass of {bad} does not fit {devices[bad]}'s budget {_gib(budgets[devices[bad]])}")
    frozen_node = max(frozen, key=lambda name: frozen[name].peak)
    _, depth, micro, breakdown, evaluation = chosen[main]
    host = host_breakdown(profile, groups, frozen, batch, micro, seq, spec.injection)
    available = host_available() if host_budget is None else host_budget
    if sum(host.values()) > available:
        raise UserError(f"graph {spec.name!r} needs {_gib(sum(host.values()))} of host memory, but "
                        f"{_gib(available)} is available")
    per_device = {d: {"budget": budgets[d], "peak": sum(c[3].values()), "eval_peak": sum(c[4].values()),
                      "nodes": on[d], "main": d == main} for d, c in chosen.items()}
    peak = sum(breakdown.values())
    minimum = max(min(v) for v in smallest.values() if v)
    return Plan(budgets[main], batch, seq, micro, max(c[1] for c in chosen.values()), groups, breakdown, peak,
                frozen[frozen_node].peak, minimum, frozen_micro, frozen_node, frozen, profile.trainable, minimum,
                minimum, MICRO_BATCH_MAJOR, 0, evaluation, host, available, per_device)


def _remote_head(refiners: list[_Node], latent: int, micro: int, seq: int) -> int:
    """What the run's device holds at a step for refiners computing elsewhere: the graph's head brings each one's
    final states over in fp32 (with their gradient) and runs the readout and output node there (the latent part of
    HEAD_PER_TOKEN); that refiner's own device counts the rest of its head."""
    return sum(micro * seq * (2 * 4 * n.width + HEAD_PER_TOKEN[1] * latent) for n in refiners)


def _best_on_device(spec, part: _Profile, batch: int, seq: int, micro: int, budget: int, peaks: list,
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
            key = _preference(part, groups, depth, micro, schedule, batch, seq, peak)
            if best_key is None or key < best_key:
                best, best_key = (groups, depth, micro, breakdown, evaluation), key
    return best


# --- the table ---------------------------------------------------------------------------------------------------
_WHY = {
    "resident_weights": "resident layer groups + final norms",
    "stream_slots": "device slots for streamed groups",
    "checkpoint_inputs": "saved group inputs, masks, cached inputs (2 micro-batches; layer-major: the batch)",
    "recompute": "one group recomputed in backward (SDPA, O(seq) attention)",
    "head_activations": "final states, readouts, output node (+ grads)",
    "trainable+optimizer": "fp32 params + grads + AdamW states, 16 B/param",
    "workspace": "quantised matmuls' transients (NF4: a dequantised linear; int8: + input, product)",
    "cuda_context": "fixed allowance: CUDA context, cuBLAS, allocator slack",
    "eval_activations": "cached inputs, final states and readouts kept; one layer at work",
    "frozen_nodes": "all five models, NF4 layers + bf16 embeddings, no lm_head",
    "slab_being_built": "the largest pinned slab, while its tensors are copied in",
    "prefix_cache_rows": "a shard being written (x2); two steps' cached rows, pinned in power-of-two blocks",
    "runtime": "fixed allowance: Python, torch, CUDA libraries",
    "kept_activations": "layer-major: every micro-batch's group inputs and gradients, pinned",
}


def format_plan(plan: Plan, spec) -> str:
    own = "".join(f"; {n.name} {n.quant}" for n in spec.nodes if n.quant not in (None, spec.quant))
    lines = [f"plan for graph {spec.name} ({spec.quant}{own}): budget {_gib(plan.budget)}, batch {plan.batch} "
             f"(micro-batch {plan.micro_batch} x {plan.accumulation} accumulation), seq {plan.seq}"
             + (f" (the spec truncates at max_length {spec.max_length})" if plan.seq > spec.max_length else ""), ""]
    if plan.devices:
        lines += ["nodes on several devices, each planned against its own budget (the tables below: "
                  f"{next(d for d, v in plan.devices.items() if v['main'])}, where the trainable parts live):"]
        lines += [f"  {d:<8} {', '.join(v['nodes']) or '(the trainable parts only)'}: training step "
                  f"{_mib(v['peak'])}, evaluation {_mib(v['eval_peak'])} of {_mib(v['budget'])} "
                  f"({max(v['peak'], v['eval_peak']) / v['budget']:.0%})" for d, v in plan.devices.items()]
        lines.append("")
    header = f"{'node':<10} {'layers':>8} {'group':>5} {'bytes':>12}  placement (layers 0-based, trained)"
    lines += [header, "-" * len(header)]
    index: dict[str, int] = {}
    for g in plan.groups:
        index[g.node] = index.get(g.node, 0) + 1
        span = f"{g.first}-{g.last - 1}" if g.last - g.first > 1 else str(g.first)
        lines.append(f"{g.node:<10} {span:>8} {index[g.node]:>5} {_mib(g.bytes):>12}  "
                     f"{'resident' if g.resident else 'streamed'}, "
                     f"{'recomputed in backward' if g.checkpointed else 'keeps its activations'}")
    streamed = plan.streamed_bytes
    lines += ["", f"resident {_mib(plan.resident_bytes)}; streamed {_mib(streamed)}"
              + (f" (pinned host slab; prefetch depth {plan.prefetch_depth}; {plan.schedule} schedule, "
                 f"{plan.traffic_per_step / 1e9:.2f} GB host-to-device per step)" if streamed else ""),
              f"trainable parameters: {plan.trainable_params:,}", "", "training step peak:"]
    for k, v in plan.breakdown.items():
        lines.append(f"  {k:<20} {_mib(v):>12}  {_WHY.get(k, '')}")
    verdict = "fits" if plan.peak <= plan.budget else "DOES NOT FIT"
    lines.append(f"  {'predicted peak':<20} {_mib(plan.peak):>12}  vs budget {_mib(plan.budget)} "
                 f"({plan.peak / plan.budget:.0%}, {verdict})")
    lines += ["", f"evaluation (no grad, micro-batch {plan.micro_batch}, placed as in training):"]
    for k, v in plan.eval_breakdown.items():
        lines.append(f"  {k:<20} {_mib(v):>12}  {_WHY.get(k, '')}")
    lines.append(f"  {'predicted peak':<20} {_mib(plan.eval_peak):>12}  vs budget {_mib(plan.budget)} "
                 f"({plan.eval_peak / plan.budget:.0%})")
    lines += ["", "host memory (every node lives there under a plan):"]
    for k, v in plan.host_breakdown.items():
        lines.append(f"  {k:<20} {_mib(v):>12}  {_WHY.get(k, '')}")
    lines.append(f"  {'predicted peak':<20} {_mib(plan.host_peak):>12}  vs {_mib(plan.host_available)} available "
                 f"({plan.host_peak / plan.host_available:.0%})")
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
