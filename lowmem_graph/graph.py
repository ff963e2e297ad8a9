"""FrozenGraph: the trainable parts of the paper's graph, wired around frozen nodes.

One training step, in the order `forward` runs it:
  prompts (each node tokenizes with its own tokenizer) -> readers' states (frozen, pooled; from the prefix cache
  when training from it) -> projections W_k and their average z -> injection into each refiner's residual stream
  at its injection layer (fused_inject) -> the refiners' upper layers (frozen; checkpointed and streamed as the
  run's placement says) -> readout W_j -> cross-attention output node -> choice logits.
Only the projections and the output node are parameters of this module; frozen nodes live outside its
state_dict, so checkpoints hold exactly what trains. Where the frozen tensors live is memory/placement.py's.
"""
from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from .align import align_index, gather_tokens
from .data import Question, format_prompt
from .errors import UserError
from .nodes import FrozenNode, default_device, load_config
from .ops import fused_inject
from .spec import GraphSpec


def load_nodes(spec: GraphSpec, device: torch.device, load_device=None, progress=None,
               logits: frozenset = frozenset()) -> dict[str, FrozenNode]:
    """Every node of `spec` frozen, in its format, onto `load_device` (default: where it computes: its own
    `device:` or the run's), computing in its device's dtype; the nodes named in `logits` keep their LM head."""
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
    return nodes


def node_device(node_spec, run_device) -> torch.device:
    """Where a node computes: the device its spec names (`device: cuda:1`), else the run's. Activations cross to
    it at the edges into the node and back to the run's device (where everything trainable lives) at its reads."""
    if node_spec.device is None:
        return torch.device(run_device)
    if node_spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"node {node_spec.name!r}: device {node_spec.device} asked for, but no CUDA device is "
                        "available")
    return torch.device(node_spec.device)


def autocast(device) -> AbstractContextManager:
    """The precision of every pass through the graph, training and evaluation alike: bf16 autocast on CUDA (the
    trainable weights stay fp32), full precision on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


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
    align: dict[tuple[str, str], torch.Tensor] | None = None   # per-token mode: (reader, refiner) -> (B, T_refiner)
    offsets: dict[str, torch.Tensor | None] | None = None     # edge runtime: each node's character offsets


@dataclass
class GraphOutput:
    logits: torch.Tensor          # (B, max_choices), -inf beyond each question's choices
    routing: torch.Tensor         # (B, n_refiners): output-node attention share per refiner


class TrainedParts(nn.Module):
    """What every graph runtime shares: the readout of the nodes the output node reads (`refiners`) into the
    output node, and the checkpointable state, which is exactly what trains (frozen nodes are not submodules)."""

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


class FrozenGraph(TrainedParts):
    def __init__(self, spec: GraphSpec, nodes: dict[str, FrozenNode]):
        super().__init__()
        self.spec = spec
        self.nodes = nodes            # a plain dict: frozen models are not submodules (not in state_dict)
        dim = spec.latent_dim
        self.readers = [n.name for n in spec.readers]
        self.refiners = [n.name for n in spec.refiners]
        self.read_proj = nn.ModuleDict({r: nn.Linear(nodes[r].width, dim, bias=False) for r in self.readers})
        self.readout = nn.ModuleDict({j: nn.Linear(nodes[j].width, dim, bias=False) for j in self.refiners})
        self.carry = nn.ModuleDict(
            {j: nn.Linear(dim, nodes[j].width, bias=False) for j in self.refiners} if spec.carry == "separate" else {})
        self.output = OutputNode(dim, spec.output.heads, spec.output.max_choices, len(self.refiners))

    @classmethod
    def build(cls, spec: GraphSpec, device=None, progress=None, seed: int | None = None,
              load_device=None, objective: str = "choice") -> "FrozenGraph":
        """Load every node frozen (4-bit by default) onto `load_device` (default: `device`; a placement says
        where), computing in `device`'s dtype, then create the trainable parts on `device`.
        `seed` is applied right before the trainable parts are initialised, so their values do not depend on
        whether loading consumed random numbers (building a tiny model, say)."""
        if objective != "choice":
            raise UserError(f"the {objective} objective runs on graphs given by their edges (see "
                            "examples/residual_coupling.yaml); the paper's shape scores answer options")
        device = torch.device(device) if device is not None else default_device()
        nodes = load_nodes(spec, device, load_device, progress)
        if seed is not None:
            torch.manual_seed(seed)
        return cls(spec, nodes).to(device)

    def stepped_layers(self) -> dict[str, tuple[int, int]]:
        """Refiner -> [first, top): the layers a step from the prefix cache runs (what a memory plan places)."""
        return {j: (self.nodes[j].inject_layer, self.nodes[j].n_layers) for j in self.refiners}

    def carry_weight(self, refiner: str) -> torch.Tensor:
        """(d_j, latent): tied to the refiner's readout (the paper's 5 matrices) or a matrix of its own."""
        return self.carry[refiner].weight if self.spec.carry == "separate" else self.readout[refiner].weight.t()

    # ---- data ------------------------------------------------------------------------------------------------
    def collate(self, questions: list[Question], cached: bool = False) -> Batch:
        """Each node tokenizes the same prompts with its own tokenizer and framing prefix. With `cached` (the
        step reads the readers' pooled states from the prefix cache) only the refiners tokenize: nothing else
        uses a reader's tokens then."""
        too_many = [q.id for q in questions if len(q.choices) > self.spec.output.max_choices]
        if too_many:
            raise UserError(f"question {too_many[0]} has more choices than output.max_choices="
                            f"{self.spec.output.max_choices}")
        texts = [format_prompt(q) for q in questions]
        per_token = self.spec.injection == "token"
        tokens, offsets = {}, {}
        for name, node in self.nodes.items():
            if cached and not per_token and name in self.readers:
                continue
            enc = node.encode(texts, offsets=per_token)
            tokens[name] = (enc["input_ids"], enc["attention_mask"])
            offsets[name] = enc.get("offset_mapping")
        align = None
        if per_token:
            align = {(r, j): align_index(offsets[r], tokens[r][1], len(self.nodes[r].spec.prefix),
                                         offsets[j], tokens[j][1], len(self.nodes[j].spec.prefix))
                     for r in self.readers for j in self.refiners}
        return Batch(tokens, torch.tensor([q.label for q in questions]),
                     torch.tensor([len(q.choices) for q in questions]), [q.id for q in questions], align)

    # ---- the step ----------------------------------------------------------------------------------------------
    def reader_states(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Frozen, input-only work: each reader's states in fp32, pooled (B, d_k) or per token (B, T_k, d_k)."""
        states = {}
        for r in self.readers:
            ids, mask = batch.tokens[r]
            node = self.nodes[r]
            full = node.read(ids, mask).float()
            states[r] = full if self.spec.injection == "token" else node.pool(full, mask)
        return states

    def _reader_inputs(self, states, batch: Batch, refiner: str) -> list[torch.Tensor]:
        """What refiner j receives from each reader: the pooled vector, or its tokens aligned to j's tokens."""
        if self.spec.injection == "token":
            return [gather_tokens(states[r], batch.align[(r, refiner)]) for r in self.readers]
        return [states[r] for r in self.readers]

    def forward(self, batch: Batch, reader_states: dict[str, torch.Tensor] | None = None,
                prefixes: dict[str, torch.Tensor] | None = None) -> GraphOutput:
        """One step's forward. `reader_states` and `prefixes` (each refiner's stream entering its injection layer)
        come from the prefix cache when training from it; without them the frozen nodes run here."""
        states = reader_states if reader_states is not None else self.reader_states(batch)
        finals = []
        for j in self.refiners:
            ids, mask = batch.tokens[j]
            finals.append(self.nodes[j].run(ids, mask, inject=self.injection(j, states, batch),
                                            prefix=prefixes[j] if prefixes is not None else None))
        return self.head(finals, batch)

    def injection(self, refiner: str, states: dict[str, torch.Tensor], batch: Batch):
        """`h -> h'` for refiner j's injection layer: the readers' states projected (W_k), averaged, carried into
        j's width and blended into its residual stream, as one fused op (None without readers)."""
        xs = self._reader_inputs(states, batch, refiner)
        if not xs:
            return None
        return functools.partial(inject_on_device, xs=xs, weights=[self.read_proj[r].weight for r in self.readers],
                                 carry=self.carry_weight(refiner), blend=self.nodes[refiner].spec.blend)


def inject_on_device(h, xs, weights, carry, blend: float):
    """fused_inject on h's device: the states and maps come to the node where it computes (nothing moves when
    every node is on the run's device)."""
    def to(t):
        return t.to(h.device) if t.device != h.device else t

    return fused_inject(h, xs=[to(x) for x in xs], weights=[to(w) for w in weights], carry=to(carry), blend=blend)
