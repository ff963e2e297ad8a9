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
