"""A graph drawn: nodes, latents and edges (topology.py) as a picture, for `lowmem-graph inspect --draw`."""
from __future__ import annotations

from pathlib import Path

from .topology import Topology


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
    boxes = {}          # drawn first: every arrow runs from its source's box to its target's box, clipped at both
    for name, (x, y) in where.items():
        latent = name in topology.latents
        label = f"{name}\n(latent, {topology.latents[name]})" if latent else name
        boxes[name] = ax.text(x, y, label, ha="center", va="center", fontsize=9, zorder=3, bbox={
            "boxstyle": "round,pad=0.4", "fc": "#fff3d6" if latent else "#dbe9f6" if name != "output" else "#e3f2dc",
            "ec": "0.4"})

    def arrow(source: str, target: str, colour: str, bend: float = 0.0) -> None:
        ax.annotate("", where[target], where[source], arrowprops={
            "arrowstyle": "-|>", "color": colour, "lw": 1.3, "connectionstyle": f"arc3,rad={bend}",
            "patchA": boxes[source].get_bbox_patch(), "patchB": boxes[target].get_bbox_patch(),
            "shrinkA": 2, "shrinkB": 2})

    def label(x: float, y: float, text: str, ha: str = "center") -> None:
        """On a white ground, so an arrow passing under it never hides a character."""
        ax.text(x, y, text, ha=ha, va="center", fontsize=7, color="0.25", zorder=2,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"})

    for e in topology.edges:
        (x0, y0), (x1, y1) = where[e.source], where[e.target]
        bridge = e.source in topology.nodes and e.target in topology.nodes
        if x0 == x1:        # nodes in one column (in lockstep): two arcs, the downward one on the left
            arrow(e.source, e.target, "C3" if bridge else "0.3", 0.5)
            side = -0.2 if y0 > y1 else 0.2
            label(x0 + side, (y0 + y1) / 2, e.describe(), ha="right" if side < 0 else "left")
            continue
        arrow(e.source, e.target, "C3" if e.kind == "bridge" and bridge else "0.3", 0.25 if bridge else 0.0)
        t = 0.3 if e.source in topology.nodes else 0.7      # on the half at the node's end, away from the fan,
        slope = (y1 - y0) / (x1 - x0)                       # beside the arrow: below a rising one, above the others
        label(x0 + t * (x1 - x0), y0 + t * (y1 - y0) + (-1 if slope > 0 else 1) * (0.1 + 0.12 * abs(slope)),
              e.describe())
    for name in topology.reads:
        arrow(name, "output", "C0")
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
