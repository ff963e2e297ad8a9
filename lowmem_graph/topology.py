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
drawn (`of_spec`, `draw`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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

    def describe(self) -> str:
        parts = []
        if self.read is not None:
            parts.append(f"read {self.read}" + (f" {self.pooling}" if self.pooling != "mean" else ""))
        if self.at is not None:
            parts.append(f"at {self.at}" + (f" a={self.blend}" if self.kind == "blend" else " gated"))
        return ", ".join(parts)


@dataclass
class Topology:
    nodes: list[str]
    latents: dict[str, int]                       # name -> width
    edges: list[Edge]
    reads: list[str] = field(default_factory=list)   # what the output node reads


_EDGE_KEYS = {"from": "source", "to": "target", "read": "read", "pooling": "pooling", "at": "at", "kind": "kind",
              "blend": "blend"}


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


def draw(topology: Topology, path: str | Path, title: str = "") -> Path:
    """The graph as a picture: columns in the order things wait for each other, the output node last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column: dict[str, int] = {}

    def depth(name: str, seen=()) -> int:
        if name not in column:
            ins = [e.source for e in topology.edges if e.target == name and e.source not in seen
                   and not (e.source in topology.nodes and name in topology.nodes)]
            column[name] = 1 + max((depth(s, (*seen, name)) for s in ins), default=-1)
        return column[name]

    for name in [*topology.nodes, *topology.latents]:
        depth(name)
    out_col = max(column.values()) + 1
    rows: dict[int, list[str]] = {}
    for name in [*topology.nodes, *topology.latents]:
        rows.setdefault(column[name], []).append(name)
    where = {name: (c, (len(names) - 1) / 2 - i) for c, names in rows.items() for i, name in enumerate(names)}
    where["output"] = (out_col, 0.0)
    height = max(len(v) for v in rows.values())
    fig, ax = plt.subplots(figsize=(3.2 * (out_col + 1), 1.2 * height + 1.5))
    for e in topology.edges:
        (x0, y0), (x1, y1) = where[e.source], where[e.target]
        bridge = e.source in topology.nodes and e.target in topology.nodes
        if x0 == x1:        # nodes in one column (in lockstep): a vertical arrow, downwards left, upwards right
            side = -0.12 if y0 > y1 else 0.12
            step = 0.2 if y0 > y1 else -0.2
            ax.annotate("", (x1 + side, y1 + step), (x0 + side, y0 - step), arrowprops={
                "arrowstyle": "-|>", "color": "C3" if bridge else "0.3", "lw": 1.3})
            ax.text(x0 + 2.5 * side, (y0 + y1) / 2, e.describe(), ha="right" if side < 0 else "left",
                    va="center", fontsize=7, color="0.25")
            continue
        bend = 0.25 if bridge else 0.0
        ax.annotate("", (x1 - 0.28, y1), (x0 + 0.28, y0), arrowprops={
            "arrowstyle": "-|>", "color": "C3" if e.kind == "bridge" and bend else "0.3",
            "connectionstyle": f"arc3,rad={bend}", "lw": 1.3})
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, e.describe(), ha="center", fontsize=7, color="0.25")
    for name in topology.reads:
        (x0, y0), (x1, y1) = where[name], where["output"]
        ax.annotate("", (x1 - 0.28, y1), (x0 + 0.28, y0), arrowprops={"arrowstyle": "-|>", "color": "C0"})
    for name, (x, y) in where.items():
        latent = name in topology.latents
        label = f"{name}\n(latent, {topology.latents[name]})" if latent else name
        ax.text(x, y, label, ha="center", va="center", fontsize=9, bbox={
            "boxstyle": "round,pad=0.4", "fc": "#fff3d6" if latent else "#dbe9f6" if name != "output" else "#e3f2dc",
            "ec": "0.4"})
    ax.set_xlim(-0.6, out_col + 0.6)
    ax.set_ylim(-height / 2 - 0.5, height / 2 + 0.5)
    ax.axis("off")
    ax.set_title(title or "graph", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
