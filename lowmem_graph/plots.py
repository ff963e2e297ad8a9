"""Training curves as a PNG: people would rather look at a loss curve than read one."""
from __future__ import annotations

from pathlib import Path

from .files import atomic_file


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, epoch records); a partial last line (a killed write) is skipped (runstate.read_metrics)."""
    from .runstate import read_metrics as records

    steps, epochs = [], []
    for record in records(path):
        (steps if record.get("kind") == "step" else epochs).append(record)
    return steps, epochs


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_path) -> Path:
    fig.tight_layout()
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    return Path(out_path)


def plot_memory(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Memory over the run, step by step: host RSS and, on CUDA, allocated now and the running peaks."""
    plt = _pyplot()
    steps, _ = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = [s["step"] for s in steps]
    for key, label in [("host_rss_mb", "host RSS"), ("cuda_allocated_mb", "GPU allocated"),
                       ("cuda_peak_allocated_mb", "GPU peak allocated"), ("cuda_peak_reserved_mb", "GPU peak reserved")]:
        if steps and key in steps[0]:
            ax.plot(x, [s[key] for s in steps], label=label)
    ax.set(xlabel="step", ylabel="MiB", title="memory (psutil RSS; torch.cuda peaks since the run started)")
    ax.legend()
    return _save(fig, out_path)


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    plt = _pyplot()
    steps, epochs = read_metrics(metrics_path)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    if steps:
        x = [s["step"] for s in steps]
        y = [s["loss"] for s in steps]
        window = max(1, len(y) // 20)
        smooth = [sum(y[max(0, i - window + 1):i + 1]) / len(y[max(0, i - window + 1):i + 1]) for i in range(len(y))]
        ax_loss.plot(x, y, alpha=0.3, label="step loss")
        ax_loss.plot(x, smooth, label=f"mean of {window}")
    ends = [e["step"] for e in epochs]
    ax_loss.plot(ends, [e["eval_loss"] for e in epochs], "o-", label="eval loss")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(ends, [e["train_acc"] for e in epochs], "o-", label="train acc")
    ax_acc.errorbar(ends, [e["eval_acc"] for e in epochs],
                    yerr=[[e["eval_acc"] - e["eval_ci"][0] for e in epochs],
                          [e["eval_ci"][1] - e["eval_acc"] for e in epochs]], fmt="o-", capsize=3,
                    label="eval acc (95% CI)")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    ax_acc.legend()
    return _save(fig, out_path)


def plot_signals(metrics_path: str | Path, out_path: str | Path) -> Path:
    """The paper's figures from a run: gradient norm per projection, the share of the projections' gradient
    that reaches the readers (paper: about 13%), and the output node's attention share per refiner."""
    plt = _pyplot()
    steps, epochs = read_metrics(metrics_path)
    fig, (ax_norms, ax_share, ax_route) = plt.subplots(1, 3, figsize=(14, 3.8))
    x = [s["step"] for s in steps]
    for name in (steps[0]["grad_norms"] if steps else {}):
        ax_norms.plot(x, [s["grad_norms"][name] for s in steps], label=name, lw=1)
    ax_norms.set(xlabel="step", ylabel="gradient norm", yscale="log", title="gradient norm per projection")
    ax_norms.legend(fontsize=7)
    ax_share.plot(x, [s["reader_grad_share"] for s in steps])
    ax_share.axhline(0.13, ls="--", color="grey", label="paper: ~13%")
    ax_share.set(xlabel="step", ylabel="share", ylim=(0, 1), title="gradient norm share of reader projections")
    ax_share.legend()
    for name in (steps[0]["routing"] if steps else {}):
        ax_route.plot(x, [s["routing"][name] for s in steps], lw=1, label=f"{name} (train)")
    for name in (epochs[0]["routing"] if epochs else {}):
        ax_route.plot([e["step"] for e in epochs], [e["routing"][name] for e in epochs], "o", label=f"{name} (eval)")
    ax_route.set(xlabel="step", ylabel="attention share", ylim=(0, 1), title="output-node routing per refiner")
    ax_route.legend(fontsize=7)
    return _save(fig, out_path)


def plot_alignment(rows: list[dict], out_path: str | Path, title: str) -> Path:
    """Heatmaps of held-out R^2 between every ordered pair of nodes: the maps, the permutation control and (when
    measured) the second task."""
    plt = _pyplot()
    nodes = list(dict.fromkeys([r["from"] for r in rows] + [r["to"] for r in rows]))
    panels = [("r2", "R^2 held out"), ("r2_permuted", "permutation control")]
    if "r2_other_task" in rows[0]:
        panels.append(("r2_other_task", "on the second task"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        grid = [[float("nan")] * len(nodes) for _ in nodes]
        for r in rows:
            grid[nodes.index(r["from"])][nodes.index(r["to"])] = r[key]
        image = ax.imshow(grid, vmin=-0.25, vmax=1.0, cmap="viridis")
        for i in range(len(nodes)):
            for j in range(len(nodes)):
                if i != j:
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if grid[i][j] < 0.5 else "black")
        ax.set_xticks(range(len(nodes)), nodes, rotation=45, ha="right")
        ax.set_yticks(range(len(nodes)), nodes)
        ax.set(xlabel="to", ylabel="from" if key == "r2" else None, title=label)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out_path)
