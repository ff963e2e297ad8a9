"""Training curves as PNGs a reader can trust: people would rather look at a loss curve than read one.

Every figure says which run it shows and what it measured. The run's name is its folder; its task, splits, device
and budget come from the folder's config.yaml (written before training starts); the chance line from the
predictions file of the last evaluation (the number of choices of every question); the plan's predicted peak,
which no file keeps, from the caller (`plan=`). `curves_figure`, `memory_figure` and `signals_figure` build the
matplotlib Figures (the tests inspect them); `plot_curves`, `plot_memory` and `plot_signals` save them as PNGs."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from .errors import UserError
from .files import atomic_file

MiB = 2 ** 20
ASSUMED_CHOICES = 4      # ARC, OpenBookQA and MMLU questions mostly have four: chance when nothing says otherwise


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, epoch records), each checked (runstate.checked_records)."""
    from .runstate import checked_records

    records = checked_records(path)
    return [r for r in records if r.get("kind") == "step"], [r for r in records if r.get("kind") != "step"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_path) -> Path:
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    return Path(out_path)


# ---- what the run folder says about the run -------------------------------------------------------------------
def run_info(metrics_path: str | Path) -> dict:
    """The run's name (its folder) and, from its config.yaml when there is one, the training tasks and split, the
    evaluated tasks and split, the device asked for and the --gpu-mem budget. Missing pieces are None."""
    run_dir = Path(metrics_path).resolve().parent
    info = {"run": run_dir.name, "task": None, "train_split": None, "evaluated": None, "eval_split": None,
            "device": None, "gpu_mem": None}
    from .spec import read_yaml

    try:
        raw = read_yaml(run_dir / "config.yaml")
    except (OSError, UserError):          # no config (or an unreadable one): the title says less
        raw = None
    train = raw.get("train") if isinstance(raw, dict) else None
    if not isinstance(train, dict):
        return info
    # torch and transformers come with it: only when there is a config to read
    from .data import task_part

    task = str(train["task"]) if train.get("task") else None
    info.update({k: train.get(k) for k in ("train_split", "eval_split", "device", "gpu_mem")}, task=task)
    if task or train.get("eval_task"):    # the training's own rule: eval_task, or the tasks without their splits
        info["evaluated"] = train.get("eval_task") or "+".join(task_part(p)[0] for p in (task or "").split("+"))
    return info


def _selection(tasks: str | None, split: str | None) -> str:
    """'arc-easy+openbookqa:train+mmlu@500' with split 'validation' -> 'arc-easy:validation + openbookqa:train +
    mmlu:validation@500': each part with the split it was read from."""
    if not tasks:
        return "?"
    from .data import task_part

    parts = []
    for part in str(tasks).split("+"):
        name, splits, sample = task_part(part)
        parts.append(f"{name}:{','.join(splits) or split or '?'}{'@' + sample if sample else ''}")
    return " + ".join(parts)


def run_title(info: dict) -> str:
    """'<run>: trained on <task:split>, evaluated on <task:split>' (or what the folder lacks)."""
    if not info.get("task"):
        return f"{info['run']} (no config.yaml: tasks and splits unknown)"
    return (f"{info['run']}: trained on {_selection(info['task'], info['train_split'])}, "
            f"evaluated on {_selection(info['evaluated'], info['eval_split'])}")


def chance_level(metrics_path: str | Path, info: dict | None = None) -> tuple[float, str]:
    """(chance accuracy, how it was found): the mean over the evaluated questions of 1/(their number of choices),
    read from the last evaluation's predictions file (each row's `probs` has one entry per choice); without it,
    1/ASSUMED_CHOICES."""
    info = info or run_info(metrics_path)
    if info.get("evaluated") and info.get("eval_split"):
        from .evaluate import predictions_name

        name = predictions_name(str(info["evaluated"]), info["eval_split"])
        path = Path(metrics_path).resolve().parent / name
        inverse = []
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    inverse.append(1 / len(row["probs"]))
                except (ValueError, KeyError, TypeError, ZeroDivisionError):
                    continue
        if inverse:
            return sum(inverse) / len(inverse), f"1/choices over {len(inverse)} {info['eval_split']} questions"
    return 1 / ASSUMED_CHOICES, f"assumed {ASSUMED_CHOICES} choices"


def epoch_ends(steps: list[dict], epochs: list[dict]) -> list[int]:
    """The step at which each epoch ended: each evaluated epoch's step, and the last step of every epoch that a
    later epoch's steps follow (an epoch still under way when the log stops has not ended)."""
    ends = {e["step"] for e in epochs if "step" in e}
    last: dict[int, int] = {}
    for s in steps:
        if "epoch" in s and "step" in s:
            last[s["epoch"]] = max(last.get(s["epoch"], s["step"]), s["step"])
    for epoch, step in last.items():
        if any(later > epoch for later in last):
            ends.add(step)
    return sorted(ends)


def _mark_epochs(ax, ends: list[int], label: bool = False) -> None:
    """A thin dotted vertical line at each epoch's end (gid 'epoch-end')."""
    for i, step in enumerate(ends):
        ax.axvline(step, ls=":", lw=0.8, color="0.55", zorder=0, gid="epoch-end",
                   label="epoch end" if label and i == 0 else None)


def _finite(xs: list, ys: list) -> tuple[list, list]:
    kept = [(x, y) for x, y in zip(xs, ys) if y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def _suptitle(fig, text: str, width: int = 120) -> None:
    fig.suptitle("\n".join(textwrap.wrap(text, width, break_on_hyphens=False)), fontsize=10)


# ---- loss and accuracy -------------------------------------------------------------------------------------------
def curves_figure(metrics_path: str | Path, *, chance: float | None = None):
    """Loss and accuracy against the step, titled with the run, its tasks and splits; a dashed chance line on the
    accuracy axis (gid 'chance'; `chance` overrides what the predictions file says), and a dotted line at each
    epoch's end (gid 'epoch-end') on both axes."""
    plt = _pyplot()
    steps, epochs = read_metrics(metrics_path)
    info = run_info(metrics_path)
    ends = epoch_ends(steps, epochs)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    if steps:
        x = [s["step"] for s in steps]
        y = [s["loss"] for s in steps]
        window = max(1, len(y) // 20)
        smooth = [sum(y[max(0, i - window + 1):i + 1]) / len(y[max(0, i - window + 1):i + 1]) for i in range(len(y))]
        ax_loss.plot(x, y, alpha=0.3, label="train loss per step")
        ax_loss.plot(x, smooth, label=f"train loss, mean of {window} steps")
    ax_loss.plot(*_finite([e["step"] for e in epochs], [e.get("eval_loss") for e in epochs]), "o-",
                 label=f"eval loss ({info['eval_split'] or 'eval split'})")
    _mark_epochs(ax_loss, ends, label=True)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_loss.legend(fontsize=8)

    ax_acc.plot(*_finite([e["step"] for e in epochs], [e.get("train_acc") for e in epochs]), "o-",
                label="train acc (epoch mean)")
    evaluated = [e for e in epochs if e.get("eval_acc") is not None]
    if evaluated:
        ci = [e.get("eval_ci") or [e["eval_acc"], e["eval_acc"]] for e in evaluated]
        ax_acc.errorbar([e["step"] for e in evaluated], [e["eval_acc"] for e in evaluated],
                        yerr=[[max(0.0, e["eval_acc"] - c[0]) for e, c in zip(evaluated, ci)],
                              [max(0.0, c[1] - e["eval_acc"]) for e, c in zip(evaluated, ci)]],
                        fmt="o-", capsize=3, label=f"eval acc, 95% CI ({info['eval_split'] or 'eval split'}, "
                                                   f"n={evaluated[-1].get('eval_n', '?')})")
    if chance is None:
        chance, how = chance_level(metrics_path, info)
    else:
        how = "given"
    ax_acc.axhline(chance, ls="--", lw=1, color="0.35", gid="chance", label=f"chance {chance:.3f} ({how})")
    _mark_epochs(ax_acc, ends)
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    ax_acc.legend(fontsize=8)
    _suptitle(fig, run_title(info))
    return fig


def plot_curves(metrics_path: str | Path, out_path: str | Path, *, chance: float | None = None) -> Path:
    return _save(curves_figure(metrics_path, chance=chance), out_path)


# ---- memory --------------------------------------------------------------------------------------------------------
MEMORY_SERIES = [("host_rss_mb", "host RSS of the process (psutil)"),
                 ("cuda_allocated_mb", "GPU allocated by torch, at the step's end"),
                 ("cuda_peak_allocated_mb", "GPU peak allocated by torch since training began"),
                 ("cuda_peak_reserved_mb", "GPU peak reserved by torch's caching allocator")]


def device_label(device) -> str:
    """'cuda:0 (NVIDIA H200)' or 'cpu': what a caller passes as `plot_memory(..., device=)`."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _budget_from_config(gpu_mem) -> float | None:
    if not gpu_mem:
        return None
    from .memory.budget import parse_size

    try:
        return parse_size(gpu_mem) / MiB
    except UserError:        # an unreadable size: no line rather than a wrong one
        return None


def memory_figure(metrics_path: str | Path, *, device: str | None = None, plan=None):
    """Memory after each step, from zero, in MiB: host RSS always and, on CUDA, torch's allocated-now and running
    peaks. The title says what was measured on which device (`device`, e.g. device_label(trainer.device); else the
    config's device, else cuda/cpu as the records show). Under a plan (`plan`: anything with `peak` and `budget` in
    bytes, and optionally `eval_peak`), dashed lines at its predicted step peak (gid 'predicted-peak'), its eval peak
    ('predicted-eval-peak', when it differs) and the budget ('budget'); without `plan` the budget still comes from
    the config's gpu_mem."""
    plt = _pyplot()
    steps, epochs = read_metrics(metrics_path)
    info = run_info(metrics_path)
    on_cuda = any("cuda_peak_allocated_mb" in s for s in steps + epochs)
    if device is None:
        asked = info.get("device")
        device = asked if asked and asked != "auto" else ("cuda" if on_cuda else "cpu")
    fig, ax = plt.subplots(figsize=(12, 4.6), layout="constrained")
    x = [s["step"] for s in steps]
    top = 0.0
    for i, (key, label) in enumerate(MEMORY_SERIES):       # C0-C3 for the measurements, C4, C5, black: the plan
        if any(key in s for s in steps):
            xs, ys = _finite(x, [s.get(key) for s in steps])
            ax.plot(xs, ys, label=label, gid=key, color=f"C{i}")
            top = max([top, *ys])
    lines = []
    if plan is not None:
        peak, budget = plan.peak / MiB, plan.budget / MiB
        lines.append((peak, "predicted-peak", f"plan: predicted training-step peak {peak:,.0f} MiB", "--", "C4"))
        eval_peak = (getattr(plan, "eval_peak", 0) or 0) / MiB
        if eval_peak and round(eval_peak) != round(peak):
            lines.append((eval_peak, "predicted-eval-peak", f"plan: predicted evaluation peak {eval_peak:,.0f} MiB",
                          "-.", "C5"))
    else:
        budget = _budget_from_config(info.get("gpu_mem"))
    if budget is not None:
        given = f" (--gpu-mem {info['gpu_mem']})" if info.get("gpu_mem") else ""
        lines.append((budget, "budget", f"budget {budget:,.0f} MiB{given}", "-", "k"))
    for y, gid, label, style, colour in lines:
        ax.axhline(y, ls=style, lw=1.2, color=colour, gid=gid, label=label)
        top = max(top, y)
    _mark_epochs(ax, epoch_ends(steps, epochs), label=True)
    measured = ("torch.cuda allocated now and its running peaks (allocated, reserved) since training began, "
                "and host RSS (psutil)" if on_cuda else "host RSS of the training process (psutil); "
                                                        "no device memory counters off CUDA")
    if info.get("gpu_mem") and plan is None:
        measured += "; the plan's predicted peak was not given to the plot"
    if lines and not on_cuda:
        measured += "; the plan's lines are GPU memory, not comparable with host RSS (no GPU in this run)"
    ax.set(xlabel="step", ylabel=f"MiB on {device}")
    ax.set_title("\n".join(textwrap.wrap(f"measured on {device}: {measured}", 130, break_on_hyphens=False)), fontsize=8)
    ax.set_ylim(0, top * 1.08 if top > 0 else 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    _suptitle(fig, f"memory: {run_title(info)}")
    return fig


def plot_memory(metrics_path: str | Path, out_path: str | Path, *, device: str | None = None, plan=None) -> Path:
    """Memory over the run, step by step: host RSS and, on CUDA, allocated now and the running peaks."""
    return _save(memory_figure(metrics_path, device=device, plan=plan), out_path)


# ---- gradient signal and routing -------------------------------------------------------------------------------
def node_colours(refiners, others=()) -> dict[str, str]:
    """One fixed colour per node: the refiners first, in the graph's order, then the other nodes (the readers)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    names = list(dict.fromkeys([*refiners, *others]))
    palette = [to_hex(c) for c in colormaps["tab10" if len(names) <= 10 else "tab20"].colors]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _node_of(part: str) -> str:
    """The node a trainable part is drawn in the colour of: `readout.<node>`; an edge's map `<kind>.<i>-<from>-<to>`
    (edge_graph names them so): a projection's or a bridge's source, a carry's target."""
    kind, _, key = part.partition(".")
    index, dash, rest = key.partition("-")
    if not (index.isdigit() and dash):
        return key
    source, _, target = rest.rpartition("-")
    return target if kind == "carry" else source


def signals_figure(metrics_path: str | Path):
    """The paper's figures from a run: gradient norm per projection, the share of the projections' gradient
    that reaches the readers (paper: about 13%), and the output node's attention share per refiner. Each node
    keeps one colour in every panel (node_colours): a refiner's readout (solid) and carry (dashed) norms, its
    training routing (line) and its evaluation routing (dots)."""
    plt = _pyplot()
    steps, epochs = read_metrics(metrics_path)
    info = run_info(metrics_path)
    ends = epoch_ends(steps, epochs)
    refiners = list(dict.fromkeys([name for r in steps[:1] + epochs[:1] for name in r.get("routing", {})]))
    projections = list(steps[0].get("grad_norms", {})) if steps else []
    colours = node_colours(refiners, [_node_of(p) for p in projections if "." in p])
    fig, (ax_norms, ax_share, ax_route) = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    x = [s["step"] for s in steps]
    for name in projections:
        kind, node = name.partition(".")[0], _node_of(name)
        ax_norms.plot(*_finite(x, [s.get("grad_norms", {}).get(name) for s in steps]), lw=1, label=name,
                      color=colours.get(node, "k"), ls="--" if kind == "carry" else "-")
    _mark_epochs(ax_norms, ends)
    ax_norms.set(xlabel="step", ylabel="gradient norm", yscale="log", title="gradient norm per projection")
    if projections:
        ax_norms.legend(fontsize=7)
    ax_share.plot(*_finite(x, [s.get("reader_grad_share") for s in steps]), color="k",  # no node's colour
                  label="reader projections' share")
    ax_share.axhline(0.13, ls="--", color="grey", label="paper: ~13%")
    _mark_epochs(ax_share, ends)
    ax_share.set(xlabel="step", ylabel="share", ylim=(0, 1), title="gradient norm share of reader projections")
    ax_share.legend(fontsize=8)
    for name in refiners:
        if any(name in s.get("routing", {}) for s in steps):
            ax_route.plot(*_finite(x, [s.get("routing", {}).get(name) for s in steps]), lw=1, color=colours[name],
                          label=f"{name} (train)")
        if any(name in e.get("routing", {}) for e in epochs):
            ax_route.plot(*_finite([e["step"] for e in epochs], [e.get("routing", {}).get(name) for e in epochs]),
                          "o", color=colours[name], label=f"{name} (eval)")
    _mark_epochs(ax_route, ends)
    ax_route.set(xlabel="step", ylabel="attention share", ylim=(0, 1), title="output-node routing per refiner")
    if refiners:
        ax_route.legend(fontsize=7)
    _suptitle(fig, f"signals: {run_title(info)}")
    return fig


def plot_signals(metrics_path: str | Path, out_path: str | Path) -> Path:
    return _save(signals_figure(metrics_path), out_path)


def plot_alignment(rows: list[dict], out_path: str | Path, title: str) -> Path:
    """Heatmaps of held-out R^2 between every ordered pair of nodes: the maps, the permutation control and (when
    measured) the second task."""
    plt = _pyplot()
    nodes = list(dict.fromkeys([r["from"] for r in rows] + [r["to"] for r in rows]))
    panels = [("r2", "R^2 held out"), ("r2_permuted", "permutation control")]
    if "r2_other_task" in rows[0]:
        panels.append(("r2_other_task", "on the second task"))
    # constrained layout keeps the rotated "to" labels and the title inside the picture; the rows are named once,
    # on the left panel, so no panel's names run into its neighbour
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.4, 4.6), squeeze=False,
                             layout="constrained")
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
        ax.set_yticks(range(len(nodes)), nodes if key == "r2" else [])
        ax.set(xlabel="to", ylabel="from" if key == "r2" else None, title=label)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="held-out R^2")
    fig.suptitle(title)
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out_path)
