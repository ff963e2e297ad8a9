"""What the memory estimate knows of each node, read off its config on the meta device (no download, no weights):
the bytes of every decoder layer in the frozen weight format, widths and heads, and which layers each pass runs
(a graph given by its edges: topology.Layers); the trainable parameter count from the widths; and the bytes one
layer keeps, allocates in backward, or works with without grad, per micro-batch and sequence length.

Every constant says in one line why it has its value; tests/test_plan_measured.py checks them against measured
tensors at reduced width.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from ..errors import UserError
from ..spec import FORMATS
from ..topology import Layers, of_spec
from .report import MiB

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
    linear_params: int = 0       # weights of a decoder layer's linears, counted on the model (GPT-2: two MLP matrices,
                                 # its Conv1D projections as linears; Llama and kin: three, a gated MLP)

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
    from ..loading import decoder_parts, meta_model

    quant = quant or spec.quant
    if quant not in FORMATS:
        raise UserError(f"quant must be one of {', '.join(FORMATS)}, got {quant!r}")
    key = json.dumps([spec.to_dict(), quant], sort_keys=True, default=str)
    if key in _PROFILES:
        return _PROFILES[key]
    nodes = {}
    metas = {n.name: meta_model(n.model, n.revision, n.trust_remote_code) for n in spec.nodes}
    bases = {name: decoder_parts(model) for name, (_, model) in metas.items()}
    topology = of_spec(spec)
    edges = _edge_layers(spec, {name: len(layers) for name, (_, layers, _) in bases.items()})
    lm = spec.train.get("objective") == "lm"
    for n in spec.nodes:
        config, model = metas[n.name]
        role, needed, inject, top, cuts, frozen_norm = edges[n.name]    # "refiner": runs at a step
        lm_vocab = config.get_text_config().vocab_size if lm and n.name in topology.reads else 0
        nodes[n.name] = dataclasses.replace(node_profile(n.name, role, config, model, n.quant or quant, needed, inject),
                                            top=top, cuts=cuts, frozen_norm=frozen_norm, lm_vocab=lm_vocab)
    into_latents = [e.source for e in topology.edges if e.target in topology.latents]
    profile = _Profile(nodes, trainable_count(spec, {name: node.width for name, node in nodes.items()}),
                       spec.latent_dim, [nodes[name].width for name in into_latents])
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
    EdgeGraph; a test checks they agree): the maps on the edges, the bridges' gates, the readouts
    and the output node."""
    dim = spec.latent_dim
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

    from ..loading import decoder_parts

    text = config.get_text_config()
    base, layers, norm = decoder_parts(model)
    sizes = [_param_bytes(layer, quant) for layer in layers]
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    table = base.get_input_embeddings().weight
    layer = layers[0]
    outputs = {m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    return _Node(name, role, text.hidden_size, intermediate, kv_heads * head_dim, heads,
                 getattr(text, "attn_logit_softcapping", None) is not None,
                 len(sizes), [b for b, _ in sizes], [m for _, m in sizes],
                 _param_bytes(norm, quant)[0] if norm is not None else 0, needed, inject, heads * head_dim, head_dim,
                 sum(1 for m in layer.modules() if "norm" in type(m).__name__.lower()),
                 heads * head_dim + 2 * kv_heads * head_dim in outputs, 2 * intermediate in outputs,
                 len(set(getattr(text, "layer_types", None) or ["full"])), quant,
                 table.numel() * _small_bytes(quant),
                 linear_params=sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear)))


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
