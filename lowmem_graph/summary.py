"""What a graph is made of, from configs alone: widths, layers, injection sites, parameter counts.

Models are instantiated on the meta device (shapes, no memory, no weights), so the paper's 16B-parameter
graph is described in a second with no download.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError
from .loading import meta_model
from .loading import bundled_config
from .spec import GraphSpec


@dataclass
class NodeShape:
    """What the trainable parts need to know of a node: its width (and, for reports, its depth and size)."""

    name: str
    role: str
    model: str
    width: int
    n_layers: int
    params: int
    site: str     # "read layer 16/16" or "inject before layer 24/32"


def reduced_config(ref: str, scale: int = 8, layers: int | None = None, vocab: int = 256):
    """The bundled configuration of a preset's model (e.g. "mistralai/Mistral-7B-v0.1") at 1/`scale` of its width
    and head counts, head size kept, optionally fewer layers: the real architecture at a size a CPU runs, for the
    planner's measured checks and the step benchmark."""
    config = bundled_config(ref)
    if config is None:
        raise UserError(f"no bundled configuration for {ref!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.hidden_size //= scale
    config.intermediate_size //= scale
    config.num_attention_heads = max(1, config.num_attention_heads // scale)
    config.num_key_value_heads = max(1, config.num_key_value_heads // scale)
    config.head_dim = head_dim
    config.vocab_size = vocab
    config.pad_token_id = config.bos_token_id = config.eos_token_id = 0
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    return config


def node_shapes(spec: GraphSpec) -> dict[str, NodeShape]:
    from .topology import of_spec

    edges = of_spec(spec).edges if spec.by_edges else []
    shapes = {}
    for n in spec.nodes:
        config, model = meta_model(n.model, n.revision, n.trust_remote_code)
        text = config.get_text_config()
        layers = text.num_hidden_layers
        if spec.by_edges:
            site = "; ".join(f"{'to ' + e.target if e.source == n.name else 'from ' + e.source} ({e.describe()})"
                             for e in edges if n.name in (e.source, e.target))
        elif n.role == "reader":
            site = f"read layer {n.read_index(layers) + 1}/{layers} ({n.pooling} pooled)"
        else:
            site = f"inject before layer {n.inject_index(layers)}/{layers} (a={n.blend})"
        shapes[n.name] = NodeShape(n.name, n.role, n.model, text.hidden_size, layers,
                                   sum(p.numel() for p in model.parameters()), site)
    return shapes


def describe(spec: GraphSpec) -> tuple[dict[str, NodeShape], dict[str, int]]:
    """Node shapes and the graph's trainable parameter count per part, from the real graph module on the meta
    device, with the objective its spec trains for."""
    from .edge_graph import EdgeGraph

    shapes = node_shapes(spec)
    with torch.device("meta"):
        graph = EdgeGraph(spec, shapes, spec.train.get("objective", "choice"))
    parts: dict[str, int] = {}
    for name, p in graph.named_parameters():
        key = ".".join(name.split(".")[:2]) if name.startswith(
            ("readout", "carry", "project", "bridge", "gate")) else name.split(".")[0]
        parts[key] = parts.get(key, 0) + p.numel()
    return shapes, parts


def format_description(spec: GraphSpec) -> str:
    shapes, parts = describe(spec)
    if spec.by_edges:
        latents = ", ".join(f"{lat['name']} ({lat['dim']})" for lat in spec.latents) or "none"
        lines = [f"graph {spec.name} (given by its edges): latents {latents}, {len(spec.edges)} edges, output reads "
                 f"{', '.join(spec.output.reads)}, frozen weights {spec.quant}", ""]
    else:
        lines = [f"graph {spec.name}: latent {spec.latent_dim}, carry {spec.carry}, injection {spec.injection}, "
                 f"frozen weights {spec.quant}", ""]
    header = f"{'node':<10} {'role':<8} {'model':<36} {'width':>6} {'layers':>6} {'params':>9}  site"
    lines += [header, "-" * len(header)]
    for s in shapes.values():
        lines.append(f"{s.name:<10} {s.role:<8} {s.model[-36:]:<36} {s.width:>6} {s.n_layers:>6} "
                     f"{_human(s.params):>9}  {s.site}")
    frozen = sum(s.params for s in shapes.values())
    trainable = sum(parts.values())
    lines += ["", "trainable parameters:"]
    lines += [f"  {k:<24} {v:>12,}" for k, v in parts.items()]
    lines += [f"  {'total':<24} {trainable:>12,}  ({_human(trainable)})",
              f"frozen parameters: {frozen:,} ({_human(frozen)}); trainable share {trainable / frozen:.4%}"]
    return "\n".join(lines)


def _human(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
