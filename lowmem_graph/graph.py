"""FrozenGraph: the trainable parts of the paper's graph, wired around frozen nodes.

One step, top to bottom (`forward`):
  tokenize per node -> readers (frozen, pooled) -> project W_k + average -> inject into each refiner at its
  injection layer -> refiners' final states -> project W_j -> cross-attention output node -> choice logits.
Only the projections and the output node are parameters of this module; frozen nodes live outside its
state_dict, so checkpoints hold exactly what trains.
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
from .nodes import FrozenNode, default_device
from .ops import fused_inject
from .spec import GraphSpec


def autocast(device) -> AbstractContextManager:
    """The precision of every pass through the graph, training and evaluation alike: bf16 autocast on CUDA (the
    trainable weights stay fp32), full precision on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def _inject(h, xs, weights, carry, blend):
    return fused_inject(h, xs, weights, carry, blend)


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


@dataclass
class GraphOutput:
    logits: torch.Tensor          # (B, max_choices), -inf beyond each question's choices
    routing: torch.Tensor         # (B, n_refiners): output-node attention share per refiner


@dataclass
class FrozenStates:
    """What the frozen pass produced for one data set, served per batch in the shapes `forward` takes."""

    rows: dict[str, int]                 # question id -> row
    entries: dict[str, object]           # node name -> cache.CacheEntry

    def for_batch(self, graph: "FrozenGraph", batch: Batch):
        rows = [self.rows[i] for i in batch.ids]
        device = next(graph.parameters()).device

        def padded(name):
            items = [self.entries[name].row(r) for r in rows]
            out = items[0].new_zeros(len(items), batch.tokens[name][1].shape[1], items[0].shape[-1])
            for b, (item, length) in enumerate(zip(items, batch.tokens[name][1].sum(1).tolist())):
                if len(item) != length:
                    raise RuntimeError(f"prefix cache row of {name} has {len(item)} tokens, the batch {length}")
                out[b, : len(item)] = item
            return out.to(device)

        readers = {r: (padded(r) if graph.spec.injection == "token"
                       else torch.cat([self.entries[r].row(i) for i in rows]).to(device)).float() for r in graph.readers}
        return readers, {j: padded(j) for j in graph.refiners}


class FrozenGraph(nn.Module):
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
              nodes_on_host: bool = False) -> "FrozenGraph":
        """Load every node frozen (4-bit by default), then create the trainable parts on `device`.

        `nodes_on_host` keeps the frozen models in host memory (a memory plan moves what it needs).
        `seed` is applied right before the trainable parts are initialised, so their values do not depend on
        whether loading consumed random numbers (building a tiny model, say)."""
        device = torch.device(device) if device is not None else default_device()
        nodes = {}
        for node_spec in spec.nodes:
            if progress:
                progress(f"loading {node_spec.name} ({node_spec.model}, {spec.quant})")
            nodes[node_spec.name] = FrozenNode.load(node_spec, spec.quant, "cpu" if nodes_on_host else device,
                                                    spec.max_length, compute_device=device)
        if seed is not None:
            torch.manual_seed(seed)
        return cls(spec, nodes).to(device)

    def carry_weight(self, refiner: str) -> torch.Tensor:
        """(d_j, latent): tied to the refiner's readout (the paper's 5 matrices) or a matrix of its own."""
        return self.carry[refiner].weight if self.spec.carry == "separate" else self.readout[refiner].weight.t()

    # ---- data ------------------------------------------------------------------------------------------------
    def collate(self, questions: list[Question]) -> Batch:
        """Each node tokenizes the same prompts with its own tokenizer and framing prefix."""
        too_many = [q.id for q in questions if len(q.choices) > self.spec.output.max_choices]
        if too_many:
            raise UserError(f"question {too_many[0]} has more choices than output.max_choices="
                            f"{self.spec.output.max_choices}")
        texts = [format_prompt(q) for q in questions]
        per_token = self.spec.injection == "token"
        tokens, offsets = {}, {}
        for name, node in self.nodes.items():
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
        """`reader_states` and `prefixes` (each refiner's stream entering its injection layer) come from the
        frozen-prefix cache when training from it; without them the frozen nodes run here."""
        states = reader_states if reader_states is not None else self.reader_states(batch)
        weights = [self.read_proj[r].weight for r in self.readers]
        projected, masks = [], []
        for j in self.refiners:
            node, (ids, mask) = self.nodes[j], batch.tokens[j]
            xs = self._reader_inputs(states, batch, j)
            carry, blend = self.carry_weight(j), node.spec.blend
            # bound now, not looked up later: a checkpointed recompute in backward calls it again
            inject = functools.partial(_inject, xs=xs, weights=weights, carry=carry, blend=blend) if xs else None
            final = node.run(ids, mask, inject=inject, prefix=prefixes[j] if prefixes is not None else None)
            projected.append(self.readout[j](final.float()))
            masks.append(mask.to(final.device))
        device = projected[0].device
        logits, routing = self.output(projected, masks, batch.n_choices.to(device))
        return GraphOutput(logits, routing)

    # ---- the model-major frozen pass ------------------------------------------------------------------------
    def precompute(self, questions: list[Question], cache, batch_size: int = 16, progress: bool = True,
                   placements: dict | None = None) -> "FrozenStates":
        """Run every node once over all questions, one model after the other, keeping what is input-only:
        readers' states and refiners' streams at their injection layer. Entries already cached are reused.
        `placements` (a memory plan's `frozen`) says per node which of those layers stay on the device and
        which stream."""
        from .cache import PROMPT_FORMAT, fingerprint, tokenizer_fingerprint

        ids = [q.id for q in questions]
        if len(set(ids)) != len(ids):
            raise UserError("question ids repeat in this data set; the prefix cache needs unique ids")
        texts = [format_prompt(q) for q in questions]
        data = fingerprint(list(zip(ids, texts)))
        entries = {}
        for name, node in self.nodes.items():
            reader = name in self.readers
            pooled = reader and self.spec.injection == "pooled"
            what = (("tokens" if not pooled else node.spec.pooling, node.read_layer) if reader
                    else ("prefix", node.inject_layer))
            key = fingerprint(node.identity, what, node.spec.prefix, node.max_length,
                              tokenizer_fingerprint(node.tokenizer), PROMPT_FORMAT, data)[:32]
            entry = cache.load(key)
            if entry is None:
                lengths = node.token_lengths(texts)
                order = sorted(range(len(texts)), key=lambda i: -lengths[i])   # little padding; longest first
                per_row = 4 * node.width if pooled else node.model.dtype.itemsize * node.width
                expected = per_row * (len(texts) if pooled else sum(lengths))
                with node.visiting(next(self.parameters()).device, (placements or {}).get(name)):
                    rows = self._frozen_rows(node, reader, [texts[i] for i in order], batch_size, progress)
                    entry = cache.save(key, rows, order, {"node": name, "model": node.spec.model, "what": what},
                                       expected)
            entries[name] = entry
        return FrozenStates({q: i for i, q in enumerate(ids)}, entries)

    def _frozen_rows(self, node: FrozenNode, reader: bool, texts: list[str], batch_size: int, progress: bool):
        """One node over all prompts, yielding per prompt a reader's states (per token in the node's dtype, or
        pooled in fp32) or a refiner's stream entering its injection layer."""
        from tqdm.auto import tqdm

        pooled = reader and self.spec.injection == "pooled"
        for start in tqdm(range(0, len(texts), batch_size), desc=f"caching {node.spec.name}",
                          disable=None if progress else True, leave=False):
            enc = node.encode(texts[start:start + batch_size])
            ids, mask = enc["input_ids"], enc["attention_mask"]
            if reader:
                out = node.read(ids, mask)
                out = node.pool(out.float(), mask)[:, None] if pooled else out
            else:
                out = node.prefix(ids, mask)
            yield from (o.cpu() if pooled else o[: int(m.sum())].cpu() for o, m in zip(out, mask))

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def load_trainable(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load projections/output node, refusing clearly when the graph's widths do not match."""
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
