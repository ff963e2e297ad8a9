"""A graph written as what it is: nodes, latents and the edges between them (the spec's `edges:` form).

    latents: [{name: z, dim: 1024}]
    edges:
      - {from: llama, read: -1, pooling: mean, to: z}     # a node's residual stream at a layer, into a latent
      - {from: z, to: phi3, at: 0.75, blend: 0.25}          # a latent into a node's residual stream (norm-matched)
      - {from: phi3, read: 12, to: mistral, at: 14, kind: bridge}   # node to node, in lockstep (Residual Coupling)
    output: {reads: [phi3, mistral], heads: 8}

Every edge is checked here, and so is the graph as a whole: a node waits for what a latent it receives pools, so
those dependencies may not form a cycle (refused with the path named); nodes joined by bridges run in lockstep,
layer by layer, so a bridge must write above the layer it reads. A graph of the paper's shape (readers -> one
latent -> refiners -> the output node) becomes the node roles that the prefix cache, the planner and streaming
serve (`to_roles`); any other shape keeps its edges and runs on the edge runtime (edge_graph.py). Any graph can be
drawn (`of_spec`, drawing.py's `draw`).

What a graph does to each node's layers follows from the edges and each node's layer count alone (`Layers`:
where each edge reads and writes, what a step runs of each node, what the prefix cache keeps): the edge runtime
and the memory planner read it, neither builds the other's objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError

EDGE_KINDS = ("blend", "bridge")       # norm-matched blend (the paper) | gated additive update (Residual Coupling)
POOLINGS = ("mean", "last", "token")


@dataclass
class Edge:
    source: str                     # a node or a latent
    target: str                     # a latent or a node
    read: int | None = None         # source node: the decoder layer read (1-based, negative from the top)
    pooling: str = "mean"           # mean | last (one vector per example) | token (per token, aligned by characters)
    at: float | int | None = None   # target node: where it is written (a depth in (0, 1), or a 1-based layer)
    kind: str = "blend"             # into a node: blend | bridge
    blend: float = 0.25             # blend: a in h <- (1 - a) h + a * z_hat * ||h||
    train: bool = True              # false: its weights stay as they start (from --init-from, or at random)

    def describe(self) -> str:
        parts = []
        if self.read is not None:
            parts.append(f"read {self.read}" + (f" {self.pooling}" if self.pooling != "mean" else ""))
        if self.at is not None:
            parts.append(f"at {self.at}" + (f" a={self.blend}" if self.kind == "blend" else " gated"))
        if not self.train:
            parts.append("frozen")
        return ", ".join(parts)


@dataclass
class Topology:
    nodes: list[str]
    latents: dict[str, int]                       # name -> width
    edges: list[Edge]
    reads: list[str] = field(default_factory=list)   # what the output node reads


_EDGE_KEYS = {"from": "source", "to": "target", "read": "read", "pooling": "pooling", "at": "at", "kind": "kind",
              "blend": "blend", "train": "train"}


def parse(raw: dict, source: str) -> Topology:
    """The `latents`, `edges` and `output.reads` of a spec, each edge checked and the whole checked as a graph."""
    nodes = [n.get("name") for n in raw.get("nodes") or [] if isinstance(n, dict)]
    latents = {}
    for i, lat in enumerate(raw.get("latents") or []):
        where = f"{source}: latents[{i}]"
        if not isinstance(lat, dict) or set(lat) - {"name", "dim"} or "name" not in lat:
            raise UserError(f"{where}: expected {{name, dim}}, got {lat!r}"[:300])
        dim = lat.get("dim", raw.get("latent_dim", 1024))
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise UserError(f"{where}: dim must be a positive integer, got {dim!r}")
        latents[lat["name"]] = dim
    clash = set(nodes) & set(latents)
    if clash:
        raise UserError(f"{source}: {sorted(clash)[0]!r} names both a node and a latent")
    if not isinstance(raw.get("edges"), list) or not raw["edges"]:
        raise UserError(f"{source}: 'edges' must be a non-empty list")
    edges = [_edge(e, f"{source}: edges[{i}]", nodes, latents) for i, e in enumerate(raw["edges"])]
    output = raw.get("output") or {}
    reads = output.get("reads") if isinstance(output, dict) else None
    if not isinstance(reads, list) or not reads or not all(r in nodes for r in reads):
        raise UserError(f"{source}: output.reads must list the nodes the output node reads (of {nodes}), "
                        f"got {reads!r}")
    for name in latents:
        if not any(e.target == name for e in edges) or not any(e.source == name for e in edges):
            raise UserError(f"{source}: latent {name!r} needs an edge into it and one out of it")
    for name in nodes:
        if name not in reads and not any(name in (e.source, e.target) for e in edges):
            raise UserError(f"{source}: node {name} has no edge and the output node does not read it")
    topology = Topology(nodes, latents, edges, reads)
    check_acyclic(topology, source)
    return topology


def _edge(raw, where: str, nodes: list[str], latents: dict[str, int]) -> Edge:
    if not isinstance(raw, dict) or "from" not in raw or "to" not in raw:
        raise UserError(f"{where}: an edge needs 'from' and 'to', got {raw!r}"[:300])
    unknown = set(raw) - set(_EDGE_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(_EDGE_KEYS)})")
    edge = Edge(**{_EDGE_KEYS[k]: v for k, v in raw.items()})
    for end in (edge.source, edge.target):
        if end not in nodes and end not in latents:
            raise UserError(f"{where}: {end!r} is neither a node ({', '.join(nodes)}) nor a latent "
                            f"({', '.join(latents) or 'none'})")
    if edge.source in latents and edge.target in latents:
        raise UserError(f"{where}: a latent feeds nodes, not another latent ({edge.source} -> {edge.target})")
    if edge.source == edge.target:
        raise UserError(f"{where}: {edge.source} -> {edge.source} is a loop")
    if not isinstance(edge.train, bool):
        raise UserError(f"{where}: train must be true or false, got {edge.train!r}")
    if edge.source in nodes:
        if not isinstance(edge.read, int) or isinstance(edge.read, bool) or edge.read == 0:
            raise UserError(f"{where}: reading {edge.source} needs 'read', a non-zero layer (1-based, negative from "
                            f"the top), got {edge.read!r}")
        if edge.pooling not in POOLINGS:
            raise UserError(f"{where}: pooling must be one of {', '.join(POOLINGS)}, got {edge.pooling!r}")
    elif edge.read is not None:
        raise UserError(f"{where}: 'read' belongs to an edge out of a node; {edge.source} is a latent")
    if edge.target in nodes:
        at = edge.at
        if isinstance(at, bool) or not (isinstance(at, float) and 0 < at < 1 or isinstance(at, int) and at >= 1):
            raise UserError(f"{where}: writing into {edge.target} needs 'at', a depth in (0, 1) or a 1-based layer, "
                            f"got {at!r}")
        if edge.kind not in EDGE_KINDS:
            raise UserError(f"{where}: kind must be one of {', '.join(EDGE_KINDS)}, got {edge.kind!r}")
        if not isinstance(edge.blend, (int, float)) or not 0 <= edge.blend <= 1:
            raise UserError(f"{where}: blend must be in [0, 1], got {edge.blend!r}")
    elif edge.at is not None:
        raise UserError(f"{where}: 'at' belongs to an edge into a node; {edge.target} is a latent")
    if edge.source in nodes and edge.target in nodes and isinstance(edge.at, int) and edge.read > 0 \
            and edge.at <= edge.read:
        raise UserError(f"{where}: a bridge runs in lockstep, so it writes above the layer it reads: {edge.source} "
                        f"layer {edge.read} -> {edge.target} layer {edge.at} (write at {edge.read + 1} or above)")
    return edge


def check_acyclic(topology: Topology, source: str) -> None:
    """A node waits for every latent it receives, and a latent for every node it pools: those waits may not come
    back to where they started. Nodes joined by bridges run in lockstep (one unit), so a latent between two of
    them is a cycle too. The cycle is named in the data's order."""
    group = {n: n for n in topology.nodes}          # lockstep units: union of nodes joined by bridges

    def find(n):
        while group[n] != n:
            n = group[n]
        return n

    for e in topology.edges:
        if e.source in group and e.target in group:
            group[find(e.source)] = find(e.target)
    waits: dict[str, list[tuple[str, str]]] = {}    # unit or latent -> [(what it waits for, the edge's words)]
    for e in topology.edges:
        if e.source in group and e.target in group:
            continue
        before = find(e.source) if e.source in group else e.source
        after = find(e.target) if e.target in group else e.target
        waits.setdefault(after, []).append((before, f"{e.source} -> {e.target}"))
    state: dict[str, int] = {}                      # 1: on the path, 2: done
    units: list[str] = []                           # the path, against the data's flow ...
    words: list[str] = []                           # ... and the edge taken at each step of it

    def visit(unit: str) -> None:
        state[unit] = 1
        units.append(unit)
        for before, edge in waits.get(unit, []):
            if state.get(before) == 1:
                cycle = [*words[units.index(before):], edge]
                raise UserError(f"{source}: the graph has a cycle: {', '.join(reversed(cycle))}")
            if state.get(before) is None:
                words.append(edge)
                visit(before)
                words.pop()
        units.pop()
        state[unit] = 2

    for unit in list(waits):
        if state.get(unit) is None:
            visit(unit)


# ---- the paper's shape: edges <-> node roles ------------------------------------------------------------------
def to_roles(raw: dict, source: str) -> dict | None:
    """A spec in the edges form, as the role form of the paper's shape (readers -> one latent -> refiners -> the
    output node), which the prefix cache, the planner and streaming serve; None for a graph of any other shape,
    which the edge runtime runs (edge_graph.py)."""
    topology = parse(raw, source)
    for node in raw["nodes"]:
        if node.get("role", "node") != "node":
            raise UserError(f"{source}: node {node['name']}: with edges, a node's role comes from its edges; "
                            "drop 'role'")
    if len(topology.latents) != 1:
        return None
    (latent, dim), = topology.latents.items()
    readers = {e.source: e for e in topology.edges if e.target == latent}
    refiners = {e.target: e for e in topology.edges if e.source == latent}
    poolings = {e.pooling for e in readers.values()}
    paper = (not any(e.source in topology.nodes and e.target in topology.nodes for e in topology.edges)
             and not set(readers) & set(refiners) and set(readers) | set(refiners) == set(topology.nodes)
             and topology.reads == [n for n in topology.nodes if n in refiners]
             and len(readers) == sum(e.target == latent for e in topology.edges)
             and len(refiners) == sum(e.source == latent for e in topology.edges)
             and not ("token" in poolings and len(poolings) > 1)
             and all(e.kind == "blend" and isinstance(e.at, float) for e in refiners.values()))
    if not paper:
        return None
    nodes = []
    for node in raw["nodes"]:
        name, node = node["name"], dict(node)
        if name in readers:
            e = readers[name]
            node.update(role="reader", read_layer=e.read, pooling="mean" if e.pooling == "token" else e.pooling)
        else:
            node.update(role="refiner", inject_depth=refiners[name].at, blend=refiners[name].blend)
        nodes.append(node)
    roles = {k: v for k, v in raw.items() if k not in ("latents", "edges")}
    output = {k: v for k, v in (raw.get("output") or {}).items() if k != "reads"}
    injection = "token" if poolings == {"token"} else "pooled"
    if raw.get("injection", injection) != injection:
        raise UserError(f"{source}: injection {raw['injection']!r} disagrees with the edges' pooling ({injection})")
    return {**roles, "nodes": nodes, "output": output, "latent_dim": dim, "injection": injection}


def check_causal(topology: Topology) -> None:
    """Next-token prediction may not see the text ahead: every edge out of a node reads per token (no pooling)."""
    for e in topology.edges:
        if e.source in topology.nodes and e.pooling != "token":
            raise UserError(f"edge {e.source} -> {e.target}: pooling {e.pooling} sees the whole text, which "
                            "next-token prediction may not: give edges out of nodes pooling: token")


def of_spec(spec) -> Topology:
    """Any GraphSpec as nodes, latents and edges: its own edges, or the paper's shape written as edges."""
    if spec.edges:
        return parse({"nodes": [{"name": n.name} for n in spec.nodes], "latents": spec.latents, "edges": spec.edges,
                      "output": {"reads": spec.output.reads}}, spec.name)
    return edges_of(spec)


def edges_of(spec) -> Topology:
    """A role-form GraphSpec as nodes, one latent and edges (for drawing and for writing it in the edges form)."""
    token = spec.injection == "token"
    edges = [Edge(r.name, "z", read=r.read_layer, pooling="token" if token else r.pooling) for r in spec.readers]
    edges += [Edge("z", j.name, at=j.inject_depth, blend=j.blend) for j in spec.refiners]
    return Topology([n.name for n in spec.nodes], {"z": spec.latent_dim}, edges, [j.name for j in spec.refiners])


# ---- layers: the graph placed on its nodes' decoder layers -----------------------------------------------------
@dataclass
class Site:
    """An edge placed on its nodes' layers."""
    edge: Edge
    key: str                # the edge's name among the parameters
    read: int | None        # the source node's layer read (0-based output index)
    write: int | None       # the target node's layer written (0-based input index)


def place(i: int, e: Edge, n_layers: dict[str, int]) -> Site:
    """Edge number `i` on the layers of its nodes (`n_layers`: node -> its decoder layers)."""
    read = write = None
    if e.source in n_layers:
        n = n_layers[e.source]
        read = e.read - 1 if e.read > 0 else n + e.read
        if not 0 <= read < n:
            raise UserError(f"edge {e.source} -> {e.target}: read {e.read} is outside {e.source}'s layers 1..{n} "
                            f"(or -1..-{n})")
    if e.target in n_layers:
        n = n_layers[e.target]
        write = min(max(round(e.at * n), 1), n - 1) if isinstance(e.at, float) else e.at - 1
        if not 0 <= write < n:
            raise UserError(f"edge {e.source} -> {e.target}: at {e.at} is outside {e.target}'s layers 1..{n}")
    return Site(e, f"{i}-{e.source}-{e.target}", read, write)


class Layers:
    """A topology on its nodes' layers, from each node's layer count alone (`n_layers`, in the nodes' order): where
    each edge reads and writes (`sites`, `into`), which layers a step runs of each node, where its groups must be
    cut, and what the prefix cache keeps of it. No model and no module is built."""

    def __init__(self, topology: Topology, n_layers: dict[str, int]):
        self.topology, self.n_layers = topology, dict(n_layers)
        self.reads = list(topology.reads)
        self.sites = [place(i, e, self.n_layers) for i, e in enumerate(topology.edges)]
        self.into = {name: [s for s in self.sites if s.edge.target == name]
                     for name in [*self.n_layers, *topology.latents]}

    def is_bridge(self, e: Edge) -> bool:
        return e.source in self.n_layers and e.target in self.n_layers

    def check(self, objective: str = "choice") -> None:
        """Refuse what the layers make impossible: a bridge writing at or below the layer it reads, a pooled read
        under next-token prediction, a node nothing reads."""
        if objective == "lm":
            check_causal(self.topology)
        for s in self.sites:
            e = s.edge
            if self.is_bridge(e) and s.write <= s.read:
                raise UserError(f"bridge {e.source} -> {e.target}: it reads layer {s.read + 1} and writes at layer "
                                f"{s.write + 1}; nodes in lockstep write above the layer read (at {s.read + 2} or up)")
        read_from = {s.edge.source for s in self.sites if s.read is not None}
        for name in self.n_layers:
            if name not in read_from and name not in self.reads:
                raise UserError(f"node {name}: nothing reads it (no edge out of it, and the output node does not "
                                "read it)")

    def top(self, name: str) -> int:
        """How many of a node's layers run: all for a node the output reads, else up to its highest read."""
        if name in self.reads:
            return self.n_layers[name]
        return 1 + max(s.read for s in self.sites if s.edge.source == name)

    def start(self, name: str) -> int:
        """The first layer stepped: below it nothing is written or read, so the recording pass runs it (no grad)."""
        points = [s.write for s in self.into[name]] + [s.read for s in self.sites if s.edge.source == name]
        return min([*points, self.top(name) - 1])

    def entry(self, name: str) -> int | None:
        """The first layer a step runs of the node: its lowest written layer, below which everything depends on
        the input alone (the prefix cache keeps it); for a node the output reads and nothing writes into, its last
        layer read; None for a node only read below any write (the cache holds all of it)."""
        lowest = min((s.write for s in self.into[name]), default=None)
        if lowest is None and name in self.reads:
            return self.top(name) - 1
        return lowest

    def stepped_layers(self) -> dict[str, tuple[int, int]]:
        """Node -> [first, top): the layers a step from the prefix cache runs (what a memory plan places)."""
        return {n: (self.entry(n), self.top(n)) for n in self.n_layers if self.entry(n) is not None}

    def cuts(self, name: str) -> tuple[int, ...]:
        """Layers where a checkpointed group must start: the stream is written there, or read just below."""
        return tuple(sorted({s.write for s in self.into[name]}
                            | {s.read + 1 for s in self.sites if s.edge.source == name}))

    def frozen_parts(self, name: str) -> list[tuple[str, int]]:
        """The node's input-only results the prefix cache keeps, as (kind, 0-based layer): the stream entering its
        entry layer ("prefix"), and each read below it, per token ("tokens") or pooled ("mean", "last"). A node
        nothing is written into is all reads: it never runs at a step."""
        entry = self.entry(name)
        parts = [("prefix", entry)] if entry else []
        for s in self.sites:
            if s.edge.source == name and (entry is None or s.read < entry):
                part = ("tokens" if s.edge.pooling == "token" else s.edge.pooling, s.read)
                if part not in parts:
                    parts.append(part)
        return parts

    def units(self) -> list[list[str]]:
        """Lockstep units (nodes joined by bridges) in the order their latents need them."""
        unit = {n: n for n in self.n_layers}

        def find(n):
            while unit[n] != n:
                n = unit[n]
            return n

        for s in self.sites:
            if self.is_bridge(s.edge):
                unit[find(s.edge.source)] = find(s.edge.target)
        members: dict[str, list[str]] = {}
        for n in self.n_layers:
            members.setdefault(find(n), []).append(n)
        latents = self.topology.latents
        needs = {u: {find(src.edge.source) for n in ns for s in self.into[n] if s.edge.source in latents
                     for src in self.into[s.edge.source]} for u, ns in members.items()}
        order: list[str] = []
        while len(order) < len(members):        # acyclic: check_acyclic refused cycles already
            order += [u for u in members if u not in order and needs[u] <= set(order)]
        return [members[u] for u in order]

    @property
    def pairs(self) -> set[tuple[str, str]]:
        """(source, target) node pairs whose tokens are aligned: per-token edges into a latent, and bridges."""
        out = set()
        for s in self.sites:
            e = s.edge
            if self.is_bridge(e):
                out.add((e.source, e.target))
            elif e.target in self.topology.latents and e.pooling == "token":
                out |= {(e.source, t.edge.target) for t in self.sites if t.edge.source == e.target}
        return out
