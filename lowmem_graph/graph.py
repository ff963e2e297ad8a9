"""What a graph is built from besides its edges: the frozen nodes loaded for a run, the device each computes on,
the run's precision, a step's batch, and the trainable head (readout W_j and the cross-attention output node).

The runtime (edge_graph.py) wires these around the frozen nodes. Only the maps and the output node are parameters;
frozen nodes live outside the state_dict, so checkpoints hold exactly what trains. Where the frozen tensors live
is memory/placement.py's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .loading import load_config
from .nodes import FrozenNode, node_device
from .ops import fused_inject
from .spec import GraphSpec


def load_nodes(spec: GraphSpec, device: torch.device, load_device=None, progress=None,
               logits: frozenset = frozenset(), loaded=None) -> dict[str, FrozenNode]:
    """Every node of `spec` frozen, in its format, onto `load_device` (default: where it computes: its own
    `device:` or the run's), computing in its device's dtype; the nodes named in `logits` keep their LM head.
    `loaded(node)` runs after each one (a plan's disk tier takes its groups before the next node loads)."""
    refused = []        # every node's config first: a gated or missing model is said before any download
    for node_spec in spec.nodes:
        try:
            load_config(node_spec.model, revision=node_spec.revision, trust_remote_code=node_spec.trust_remote_code)
        except UserError as e:
            refused.append(f"node {node_spec.name}: {e}")
    if refused:
        raise UserError(f"{len(refused)} of {len(spec.nodes)} nodes cannot be loaded, so nothing was: "
                        + "; ".join(refused))
    nodes = {}
    for node_spec in spec.nodes:
        if progress:
            progress(f"loading {node_spec.name} ({node_spec.model}, {node_spec.format(spec.quant)})")
        own = node_device(node_spec, device)
        nodes[node_spec.name] = FrozenNode.load(node_spec, node_spec.format(spec.quant), load_device or own,
                                                spec.max_length, compute_device=own, logits=node_spec.name in logits,
                                                progress=progress)
        if loaded:
            loaded(nodes[node_spec.name])
    return nodes


class OutputNode(nn.Module):
    """One learned query per answer slot (A, B, ...) attends over the projected tokens of every refiner.

    A learned source embedding tells the node which refiner a token came from; the attention mass each
    refiner receives is returned as its routing share (the paper's "selective routing").
    """

    def __init__(self, dim: int, heads: int, max_choices: int, n_sources: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(max_choices, dim) * dim ** -0.5)
        self.sources = nn.Parameter(torch.zeros(n_sources, dim))
        self.key_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.score = nn.Linear(dim, 1)

    def forward(self, states, masks, n_choices):
        keys = torch.cat([s + self.sources[i] for i, s in enumerate(states)], dim=1)
        padding = ~torch.cat(masks, dim=1).bool()
        q = self.queries.unsqueeze(0).expand(keys.shape[0], -1, -1)
        out, weights = self.attn(q, self.key_norm(keys), self.key_norm(keys), key_padding_mask=padding)
        logits = self.score(out + q).squeeze(-1)
        slots = torch.arange(logits.shape[1], device=logits.device)
        valid = slots[None, :] < n_choices[:, None]
        logits = logits.masked_fill(~valid, float("-inf"))
        # weights: (B, choices, keys), averaged over heads; share per source over the valid queries
        per_source = torch.stack([w.sum(-1) for w in weights.split([s.shape[1] for s in states], dim=-1)], -1)
        share = (per_source * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        return logits, share


@dataclass
class Batch:
    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]]   # node name -> (input_ids, attention_mask)
    labels: torch.Tensor
    n_choices: torch.Tensor
    ids: list[str]
    align: dict[tuple[str, str], torch.Tensor] | None = None   # aligned pairs: (source, target) -> (B, T_target)
    offsets: dict[str, torch.Tensor | None] | None = None     # each node's character offsets, where needed
    picks: dict[str, torch.Tensor] | None = None     # lm: each read node's predicted positions, flat in (B, T-1)
    masks: dict[str, dict | None] | None = None      # each node's attention masks, made at collation (masks.py)


@dataclass
class GraphOutput:
    logits: torch.Tensor          # (B, max_choices), -inf beyond each question's choices
    routing: torch.Tensor         # (B, n_refiners): output-node attention share per refiner


class TrainedParts(nn.Module):
    """The readout of the nodes the output node reads (`refiners`) into the output node, and the checkpointable
    state, which is exactly what trains (frozen nodes are not submodules)."""

    refiners: list[str]
    readout: nn.ModuleDict
    output: OutputNode

    def head(self, finals: list[torch.Tensor], batch: Batch) -> GraphOutput:
        """The read nodes' final states (after their final norm) -> readout W_j -> the output node's logits."""
        here = self.output.queries.device     # a node on a device of its own sends its states here
        projected = [self.readout[j](final.float().to(here)) for j, final in zip(self.refiners, finals)]
        masks = [batch.tokens[j][1].to(here) for j in self.refiners]
        logits, routing = self.output(projected, masks, batch.n_choices.to(here))
        return GraphOutput(logits, routing)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def load_trainable(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load the trainable parts, refusing clearly when the graph's widths do not match."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise UserError(f"{source}: trainable weights do not fit this graph "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        for key, value in state.items():
            if value.shape != own[key].shape:
                raise UserError(f"{source}: {key} has shape {tuple(value.shape)} but this graph needs "
                                f"{tuple(own[key].shape)} (mismatched widths: was it trained with another spec?)")
        self.load_state_dict(state)


def inject_on_device(h, xs, weights, carry, blend: float):
    """fused_inject on h's device: the states and maps come to the node where it computes (nothing moves when
    every node is on the run's device)."""
    def to(t):
        return t.to(h.device) if t.device != h.device else t

    return fused_inject(h, xs=[to(x) for x in xs], weights=[to(w) for w in weights], carry=to(carry), blend=blend)
