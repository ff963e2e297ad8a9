"""EdgeGraph: a graph of any shape, run from its edges (topology.py), layer by layer.

Every node's decoder layers run one at a time with the calls its own model loop makes (`FrozenNode.layer_calls`),
so nodes joined by bridges advance in lockstep: at each layer index every node of a lockstep unit first takes what
is written into it there (a latent's norm-matched blend, a bridge's gated update), then runs the layer, then
offers what is read at its output. Units run in the order their latents need (readers, then a middle model, then a
top model ...). Without a memory plan every activation is kept, as in a plain forward; under one, the plan's layer
groups are checkpointed (each keeps only its input) and streamed by the placement. Only the maps on the edges, the bridges' gates and the output node
train; the frozen nodes are outside the state_dict.

Objectives: "choice" (the output node scores the answer options, as in the paper) or "lm" (next-token prediction
on plain text through the frozen LM heads of the nodes the output reads; edges read per token, aligned causally).
For every node, what lies below its lowest written layer depends on the input alone: the prefix cache keeps it
(`frozen_parts`) and a memory plan places the layers above (`stepped_layers`, groups cut at `cuts`). Every graph
runs here, the paper's shape included (readers -> one latent -> refiners -> the output node); a step's loop order
over micro-batches and layer groups is step.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .align import align_index, check_settled, gather_tokens, settled_chars
from .questions import Question, format_prompt
from .errors import UserError
from .graph import Batch, GraphOutput, OutputNode, TrainedParts, inject_on_device, load_nodes
from .nodes import FrozenNode, default_device, pool
from .spec import GraphSpec
from .topology import Edge, Layers, of_spec, place
from .topology import Site as _Site

OBJECTIVES = ("choice", "lm")
GATE_INIT = -2.0        # a bridge starts nearly closed: sigmoid(-2) = 0.12 of its update goes in


class EdgeGraph(TrainedParts):
    def __init__(self, spec: GraphSpec, nodes: dict[str, FrozenNode], objective: str = "choice"):
        super().__init__()
        if objective not in OBJECTIVES:
            raise UserError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        self.spec, self.nodes, self.objective = spec, nodes, objective
        topology = self.topology = of_spec(spec)
        self.reads = list(topology.reads)
        self.refiners = self.reads          # what the output node reads (Trainer's routing names)
        self.readers: list[str] = []        # no reader roles: `frozen_parts` says what each node gives the cache
        self.layers = Layers(topology, {name: node.n_layers for name, node in nodes.items()})  # the shape's layers
        self.sites, self.into = self.layers.sites, self.layers.into
        self._check_sites()
        self.units = self._units()
        self.project = nn.ModuleDict({s.key: nn.Linear(nodes[s.edge.source].width, topology.latents[s.edge.target],
                                                       bias=False)
                                      for s in self.sites if s.edge.target in topology.latents})
        self.bridge = nn.ModuleDict({s.key: nn.Linear(nodes[s.edge.source].width, nodes[s.edge.target].width,
                                                      bias=False) for s in self.sites if self._is_bridge(s.edge)})
        self.gate = nn.ParameterDict({k: nn.Parameter(torch.tensor(GATE_INIT)) for k in self.bridge})
        dim = spec.latent_dim
        self.readout = nn.ModuleDict({j: nn.Linear(nodes[j].width, dim, bias=False) for j in self.reads}
                                     if objective == "choice" else {})
        self.carry = nn.ModuleDict({s.key: nn.Linear(topology.latents[s.edge.source], nodes[s.edge.target].width,
                                                     bias=False)
                                    for s in self.sites if s.edge.source in topology.latents and not self._tied(s)})
        self.output = (OutputNode(dim, spec.output.heads, spec.output.max_choices, len(self.reads))
                       if objective == "choice" else None)

    def load_trainable(self, state: dict[str, torch.Tensor], source: str) -> None:
        """As TrainedParts', also taking weights saved by the paper shape's former runtime, which named a reader's
        map `read_proj.<reader>` and a refiner's own carry `carry.<refiner>`."""
        former = {}
        for s in self.sites:
            if s.key in self.project:
                former[f"read_proj.{s.edge.source}."] = f"project.{s.key}."
            if s.key in self.carry:
                former[f"carry.{s.edge.target}."] = f"carry.{s.key}."
        renamed = {}
        for key, value in state.items():
            old = next((o for o in former if key.startswith(o)), None)
            renamed[former[old] + key[len(old):] if old else key] = value
        super().load_trainable(renamed, source)

    # ---- the graph's shape --------------------------------------------------------------------------------------
    def _site(self, i: int, e: Edge) -> _Site:
        return place(i, e, self.layers.n_layers)

    def _is_bridge(self, e: Edge) -> bool:
        return self.layers.is_bridge(e)

    def _tied(self, site: _Site) -> bool:
        """A latent enters an output-read node through that node's readout transposed (the paper's tied W_j), when
        the spec ties and the widths agree; otherwise through a matrix of its own."""
        return (self.spec.carry == "tied" and site.edge.target in self.readout
                and self.topology.latents[site.edge.source] == self.spec.latent_dim)

    def _check_sites(self) -> None:
        self.layers.check(self.objective)

    # the shape's layers (topology.Layers, which the memory planner reads without building a graph)
    def top(self, name: str) -> int:
        return self.layers.top(name)

    def start(self, name: str) -> int:
        return self.layers.start(name)

    def entry(self, name: str) -> int | None:
        return self.layers.entry(name)

    def stepped_layers(self) -> dict[str, tuple[int, int]]:
        return self.layers.stepped_layers()

    def cuts(self, name: str) -> tuple[int, ...]:
        return self.layers.cuts(name)

    def frozen_parts(self, name: str) -> list[tuple[str, int]]:
        return self.layers.frozen_parts(name)

    def _units(self) -> list[list[str]]:
        return self.layers.units()

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return self.layers.pairs

    # ---- building ------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, spec: GraphSpec, device=None, progress=None, seed: int | None = None, load_device=None,
              objective: str = "choice", loaded=None) -> "EdgeGraph":
        """Every node loaded frozen onto `load_device` (default: `device`; a memory plan's placement says where),
        computing in `device`'s dtype, with its LM head under the lm objective for the nodes the output reads;
        then the trainable parts on `device`, initialised right after `seed` is applied. `loaded`: see load_nodes."""
        device = torch.device(device) if device is not None else default_device()
        nodes = load_nodes(spec, device, load_device, progress,
                           frozenset(spec.output.reads) if objective == "lm" else frozenset(), loaded)
        if seed is not None:
            torch.manual_seed(seed)
        return cls(spec, nodes, objective).to(device)

    # ---- data ----------------------------------------------------------------------------------------------------
    def collate(self, questions: list[Question], cached: bool = False) -> Batch:
        """Each node tokenizes the same prompts (its own tokenizer and prefix); aligned pairs get their index."""
        if self.objective != "choice":
            raise UserError("this graph trains with the lm objective: it scores text, not answer options")
        too_many = [q.id for q in questions if len(q.choices) > self.spec.output.max_choices]
        if too_many:
            raise UserError(f"question {too_many[0]} has more choices than output.max_choices="
                            f"{self.spec.output.max_choices}")
        batch = self._encode([format_prompt(q) for q in questions], causal=False)
        batch.labels = torch.tensor([q.label for q in questions])
        batch.n_choices = torch.tensor([len(q.choices) for q in questions])
        batch.ids = [q.id for q in questions]
        return batch

    def collate_text(self, texts: list[str], ids: list[str], keep_start: bool = True,
                     start: dict[str, list[bool]] | None = None, masks: bool = True) -> Batch:
        """Plain text for the lm objective: every node tokenizes it (over max_length, its start is kept, so what a
        model sees never depends on how the text goes on; scoring a choice at a text's end keeps the end instead,
        as lm-evaluation-harness truncates); alignment is causal (align.py: a token reads only source tokens of
        the words closed before it ends). `start` {node: per row}: rows of that node that begin with its start
        token (a text scored after an empty context). Without `masks`, no attention masks are built (a batch only
        counted, never run)."""
        batch = self._encode(texts, causal=True, keep_start=keep_start, start=start, masks=masks)
        batch.ids = ids
        # where each read node predicts, found here on the host: a boolean index in the step would read the device
        batch.picks = {j: target_mask(self.nodes[j], batch, j).flatten().nonzero().squeeze(1) for j in self.reads}
        return batch

    def _encode(self, texts: list[str], causal: bool, keep_start: bool = False, start: dict | None = None,
                masks: bool = True) -> Batch:
        pairs = self.pairs
        if causal:      # next-token prediction also aligns every pair of nodes (the router baseline mixes them)
            pairs |= {(s, t) for s in self.nodes for t in self.nodes if s != t}
        offsets_needed = {n for pair in pairs for n in pair} | (set(self.reads) if causal else set())
        tokens, offsets = {}, {}
        for name, node in self.nodes.items():
            enc = node.encode(texts, offsets=name in offsets_needed, keep_start=keep_start,
                              start=(start or {}).get(name))
            tokens[name] = (enc["input_ids"], enc["attention_mask"])
            offsets[name] = enc.get("offset_mapping")
        settled = settled_chars(texts) if causal else None
        for s in {s for s, _ in pairs} if causal else ():
            row = check_settled(offsets[s], tokens[s][1], len(self.nodes[s].spec.prefix), settled)
            if row is not None:
                raise UserError(f"node {s!r}: its tokenizer makes a token across a space after a word in "
                                f"{texts[row][:60]!r}..., so what it reads per token could not be kept causal")
        align = {(s, t): align_index(offsets[s], tokens[s][1], len(self.nodes[s].spec.prefix),
                                     offsets[t], tokens[t][1], len(self.nodes[t].spec.prefix), settled)
                 for s, t in pairs}
        masks = {name: node.masks(tokens[name][1]) if masks else None for name, node in self.nodes.items()}
        return Batch(tokens, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), [], align, offsets,
                     masks=masks)

    # ---- the step ------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch, cached: dict[str, torch.Tensor] | None = None) -> GraphOutput | dict:
        """The choice logits (GraphOutput), or under the lm objective each read node's final states. `cached`:
        the nodes' input-only parts from the prefix cache (`frozen_parts`, keyed by `part_key`) for this batch:
        then each node runs from its entry layer up, and a node nothing is written into does not run."""
        return self.forward_many([(batch, cached)])[0]

    def forward_many(self, parts: list, groups: dict[str, list[tuple[int, int]]] | None = None) -> list:
        """`forward` of several micro-batches ((batch, cached) pairs) in one loop order: unit by unit, and within a
        unit by segments of layers, every micro-batch through a segment before the next. A segment is one layer
        of each node in turn, or with `groups` (node -> its layer groups [first, last), as a memory plan cuts
        them) one node's group: each group is then loaded once for every micro-batch (the layer-major schedule;
        a backward over all the micro-batches' losses visits the groups in the reverse order, since autograd runs
        what was recorded last first). Groups start wherever a node is written into and end where it is read,
        so a group sorted by its first layer finds every read it needs done."""
        runs = [self._start(batch, cached) for batch, cached in parts]
        for unit in self.units:
            for run in runs:
                self._begin_unit(run, unit)
            for name, first, last in self._segments(unit, runs[0], groups):
                for run in runs:
                    self._advance(run, name, first, last)
            for run in runs:
                for n in run.streams:
                    if n in self.reads:
                        run.finals[n] = self.nodes[n].norm(run.streams[n])
        if self.objective == "lm":
            return [run.finals for run in runs]
        return [self.head([run.finals[j] for j in self.reads], run.batch) for run in runs]

    def _start(self, batch: Batch, cached) -> "_Run":
        reads: dict[tuple, torch.Tensor] = {}
        for key, value in (cached or {}).items():
            kind, name, layer = key.split(":")
            if kind != "prefix":
                reads[(name, int(layer)) if kind == "tokens" else (name, int(layer), kind)] = value
        return _Run(batch, cached, reads)

    def _begin_unit(self, run: "_Run", unit: list[str]) -> None:
        """Each node of the unit at the layer it starts from, with the calls its model's loop makes above it."""
        run.streams, run.calls, run.starts, run.tops = {}, {}, {}, {}
        for n in unit:
            if run.cached and self.entry(n) is None:
                continue        # all of it is reads, served by the cache
            ids, mask = run.batch.tokens[n]
            prefix = run.cached.get(part_key("prefix", n, self.entry(n))) if run.cached else None
            run.starts[n], run.tops[n] = (self.entry(n) if prefix is not None else self.start(n)), self.top(n)
            run.streams[n], run.calls[n] = self.nodes[n].layer_calls(ids, mask, start=run.starts[n], prefix=prefix,
                                                                     masks=(run.batch.masks or {}).get(n))

    def _segments(self, unit: list[str], run: "_Run", groups) -> list[tuple[str, int, int]]:
        """(node, first, last) in execution order: layer by layer across the unit's nodes, or group by group."""
        if groups is None:
            return [(n, i, i + 1) for i in range(min(run.starts.values(), default=0), max(run.tops.values(), default=0))
                    for n in run.streams if run.starts[n] <= i < run.tops[n]]
        order = {n: k for k, n in enumerate(run.streams)}
        segments = [(first, order[n], n, last) for n in run.streams for first, last in groups[n]]
        covered = {n: sorted(i for first, _, m, last in segments if m == n for i in range(first, last))
                   for n in run.streams}
        for n in run.streams:
            if covered[n] != list(range(run.starts[n], run.tops[n])):
                raise RuntimeError(f"the layer groups of {n} do not cover the layers a step runs, "
                                   f"{run.starts[n]}..{run.tops[n] - 1}")
        return [(n, first, last) for first, _, n, last in sorted(segments)]

    def _advance(self, run: "_Run", n: str, first: int, last: int) -> None:
        """Node n's layers [first, last) for one micro-batch: writes into a layer's input, the layer, its reads."""
        for i in range(first, last):
            for site in self.into[n]:
                if site.write == i:
                    run.streams[n] = self._write(site, run.streams[n], run.batch, run.reads)
            run.streams[n] = _run_layer(run.calls[n][i - run.starts[n]], run.streams[n])
            if any(s.edge.source == n and s.read == i for s in self.sites):
                run.reads[(n, i)] = self.nodes[n].norm(run.streams[n])

    def _write(self, site: _Site, h: torch.Tensor, batch: Batch, reads: dict) -> torch.Tensor:
        e = site.edge
        if self._is_bridge(e):      # gated additive update (Residual Coupling), computed where the bridge lives
            bridge = self.bridge[site.key]
            x = gather_tokens(reads[(e.source, site.read)].float(), batch.align[(e.source, e.target)])
            update = torch.sigmoid(self.gate[site.key]) * bridge(x.to(bridge.weight.device))
            return (h.float() + update.to(h.device)).to(h.dtype)
        ins = self.into[e.source]       # the latent: its inputs projected and averaged, carried in, blended
        if not ins:
            return h                    # a latent nothing writes into (a learned head alone) carries nothing
        xs = [self._latent_input(s, e.target, batch, reads) for s in ins]
        carry = self.readout[e.target].weight.t() if self._tied(site) else self.carry[site.key].weight
        return inject_on_device(h, xs=xs, weights=[self.project[s.key].weight for s in ins], carry=carry,
                                blend=e.blend)

    def _latent_input(self, site: _Site, target: str, batch: Batch, reads: dict) -> torch.Tensor:
        e = site.edge
        if (e.source, site.read, e.pooling) in reads:      # pooled by the frozen pass
            return reads[(e.source, site.read, e.pooling)].float()
        states = reads[(e.source, site.read)].float()
        if e.pooling == "token":
            return gather_tokens(states, batch.align[(e.source, target)])
        return pool(states, batch.tokens[e.source][1], e.pooling)


@dataclass
class _Run:
    """One micro-batch's forward under way: its inputs, what has been read, and the current unit's streams."""
    batch: Batch
    cached: dict | None
    reads: dict
    finals: dict = field(default_factory=dict)
    streams: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    starts: dict = field(default_factory=dict)
    tops: dict = field(default_factory=dict)


def part_key(kind: str, node: str, layer: int) -> str:
    """The name of one input-only part of a node, in the prefix cache's per-batch dict."""
    return f"{kind}:{node}:{layer}"


def _run_layer(call, hidden: torch.Tensor) -> torch.Tensor:
    """One decoder layer as the model's loop calls it. Without a memory plan its activations are kept, as in any
    forward; under one, the plan's checkpointed groups keep only their inputs (its streamers attach to the layers)."""
    layer, args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def target_mask(node: FrozenNode, batch: Batch, name: str) -> torch.Tensor:
    """(B, T - 1): which next tokens a node predicts: those of the text (not its framing prefix, specials or
    padding)."""
    ids, mask = batch.tokens[name]
    offsets = (batch.offsets or {}).get(name)
    if offsets is not None:
        end = offsets[..., 1] - len(node.spec.prefix)
        is_text = (end > 0) & (offsets[..., 1] > offsets[..., 0]) & mask.bool()
    else:
        is_text = mask.bool().clone()
        is_text[:, 0] = False
    return is_text[:, 1:]


def lm_loss(node: FrozenNode, final: torch.Tensor, batch: Batch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL, number of predicted tokens) of a node over the text, through its frozen LM head."""
    picks = batch.picks[name].to(final.device)
    ids = batch.tokens[name][0].to(final.device)
    logits = node.logits(final[:, :-1].flatten(0, 1).index_select(0, picks))
    nll = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:].flatten().index_select(0, picks),
                                            reduction="sum")
    return nll, (picks >= 0).sum()
