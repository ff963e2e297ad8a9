"""Training curves as a PNG: people would rather look at a loss curve than read one."""
from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_file


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    steps, epochs = [], []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        (steps if record.get("kind") == "step" else epochs).append(record)
    return steps, epochs


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out_path)
