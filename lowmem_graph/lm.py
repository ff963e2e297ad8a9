"""Next-token prediction on plain text (`--objective lm`): Residual Coupling's protocol, on graphs given by edges.

Every node the output reads predicts the text's next tokens through its own frozen LM head; the loss is the mean
over those nodes of their per-token NLL, and the metric each node's perplexity on held-out text (the objective:
objectives.NextToken). Three variants run under one protocol (same text, steps, learning rate, seed, and the one
trainer, train.py), the comparison the source makes:

* alone: each model by itself, nothing trained (evaluated only);
* router: the source's mixture-of-experts baseline, a learned router over the models' outputs (objectives.Router);
  its parameters are what trains;
* coupled: the graph's edges (bridges, latents) trained.

The text is text.py's. This module runs the variants in one run folder and draws their comparison.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .files import atomic_file
from .objectives import VARIANTS
from .text import load_text


def train_lm(spec, cfg, run_dir: str | Path, variants=("coupled",), progress: bool = True, log=print,
             resume: bool = False) -> dict:
    """Train the graph on next-token prediction (and, with more `variants`, the baselines under the same protocol)
    in `run_dir`, each variant a run of the one trainer (train.train): config.yaml, metrics.jsonl (each record with
    its "variant"), lm-results.json, weights-<variant>.safetensors, lm-curves.png and, when more than one variant
    ran, lm-comparison.png. `resume`: the variants lm-results.json holds are done; the next continues from its
    checkpoint."""
    import dataclasses

    from .distributed import current
    from .files import file_sha256, save_file
    from .train import train

    check_lm(spec, cfg, variants)
    if cfg.objective != "lm":
        cfg = dataclasses.replace(cfg, objective="lm")
    run_dir, main = Path(run_dir), current().main
    done = run_dir / "lm-results.json"
    results = json.loads(done.read_text()) if resume and done.is_file() else {}
    placed = None
    for k, variant in enumerate(v for v in variants if v not in results):
        summary = train(spec, cfg, run_dir, resume=resume or bool(results) or k > 0, progress=progress, log=log,
                        variant=variant, placed=placed)
        trainer = summary.pop("trainer")
        placed = trainer.placed             # the next variant runs on the same placed graph
        if "stopped_at_step" in summary:    # max_steps: stopped with a checkpoint; --resume continues it
            break
        if main:
            results[variant] = {k: summary[k] for k in ("variant", "trainable", "epochs", "perplexity", "steps",
                                                        "gates") if k in summary}
            if summary["trainable"] or variant == "coupled":     # coupled: even with every edge frozen
                path = run_dir / f"weights-{variant}.safetensors"
                with atomic_file(path) as tmp:
                    save_file(trainer.trained.trainable_state(), str(tmp))
                results[variant]["sha256"] = file_sha256(path)      # checked by every read (variant_weights)
            with atomic_file(done) as tmp:
                tmp.write_text(json.dumps(results, indent=1))
    if main:
        plot_lm_curves(run_dir / "metrics.jsonl", run_dir / "lm-curves.png", spec.name)
        if len(results) > 1:
            plot_comparison(results, run_dir / "lm-comparison.png", spec.name)
    return results


def check_lm(spec, cfg, variants=("coupled",)) -> None:
    """What refuses an lm run, checked before its folder is made: the graph's shape, its edges, the variants."""
    from .topology import check_causal, of_spec

    if not spec.by_edges:
        raise UserError(f"the lm objective runs on graphs given by their edges; {spec.name} has the paper's shape "
                        "(see examples/residual_coupling.yaml)")
    check_causal(of_spec(spec))
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UserError(f"unknown variant {bad[0]!r} (choose from {', '.join(VARIANTS)})")
    if cfg.gpu_mem and set(variants) - {"coupled"}:
        raise UserError("--compare with --gpu-mem: the baselines run every model whole on the device; compare "
                        "without a memory plan, or train the coupled graph alone under it")


def comparison_table(results: dict) -> str:
    """One line per variant: trainable parameters and each node's perplexity."""
    nodes = list(next(iter(results.values()))["perplexity"])
    lines = [f"{'variant':<9} {'trainable':>10}  " + "  ".join(f"{n + ' ppl':>14}" for n in nodes)]
    for variant, r in results.items():
        lines.append(f"{variant:<9} {r['trainable']:>10,}  " + "  ".join(f"{r['perplexity'][n]:>14.2f}" for n in nodes))
    return "\n".join(lines)


def plot_comparison(results: dict, path: Path, name: str) -> Path:
    """Held-out perplexity per node and variant, as bars from zero (lower is better)."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    nodes = list(next(iter(results.values()))["perplexity"])
    fig, ax = plt.subplots(figsize=(2.4 + 2.2 * len(nodes), 4.0))
    width = 0.8 / len(results)
    for k, (variant, r) in enumerate(results.items()):
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(nodes))]
        bars = ax.bar(xs, [r["perplexity"][n] for n in nodes], width, label=f"{variant} ({r['trainable']:,} trained)")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(nodes)), nodes)
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_ylim(0, 1.15 * max(r["perplexity"][n] for r in results.values() for n in nodes))
    ax.set_title(f"{name}: next-token prediction, same text, steps and seed", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(results), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def plot_lm_curves(metrics: Path, path: Path, name: str) -> Path:
    """Each variant's training loss per step and held-out perplexity per epoch, from a run's metrics.jsonl."""
    from .plots import _pyplot, _save
    from .runstate import checked_records

    records = checked_records(metrics)
    plt = _pyplot()
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, variant in enumerate(dict.fromkeys(r.get("variant") for r in records)):
        steps = [r for r in records if r.get("variant") == variant and "loss" in r]
        epochs = [r for r in records if r.get("variant") == variant and "perplexity" in r]
        if steps:
            ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], color=f"C{k}", label=variant)
        for n, node in enumerate(epochs[0]["perplexity"] if epochs else []):      # a marker per node: after one
            ax_ppl.plot([r["epoch"] for r in epochs], [r["perplexity"][node] for r in epochs],    # epoch, no line
                        marker="osD^v"[n % 5], color=f"C{k}", ls=("-", "--", ":")[n % 3], label=f"{variant}: {node}")
    ax_loss.set(xlabel="step", ylabel="training loss (mean NLL per token)", title="training")
    ax_ppl.set(xlabel="epoch (0: untrained)", ylabel="held-out perplexity", title="held-out text")
    ax_ppl.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    for ax in (ax_loss, ax_ppl):
        if ax.lines:            # a run stopped before its first evaluation has no perplexity yet
            ax.legend(fontsize=7)
    fig.suptitle(f"{name}: next-token prediction", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def load_lm_run(run_dir: Path, log=print, progress: bool = True, device: str | None = None):
    """A finished lm run, placed (on `device`, default the run's): (PlacedGraph with the coupled graph's trained
    weights, {variant: its router or None} for each variant the run trained, in VARIANTS' order)."""
    import dataclasses

    from .objectives import Baseline
    from .placed import PlacedGraph
    from .runstate import variant_weights
    from .settings import load_run_config

    run_dir = Path(run_dir)
    spec, cfg = load_run_config(run_dir)
    cfg = dataclasses.replace(cfg, device=device) if device else cfg
    weights = variant_weights(run_dir, "coupled")
    trained = json.loads((run_dir / "lm-results.json").read_text())
    routers = {v: None for v in VARIANTS if v in trained or v == "coupled"}
    router = variant_weights(run_dir, "router") if "router" in routers else None
    placed = PlacedGraph(spec, cfg, log, progress)
    placed.graph.load_trainable(weights, str(run_dir / "weights-coupled.safetensors"))
    if router is not None:
        baseline = Baseline(placed.graph, "router")
        baseline.load_trainable(router, str(run_dir / "weights-router.safetensors"))
        routers["router"] = baseline.router
    placed.graph.eval()
    return placed, routers


def evaluate_run(run_dir: Path, split: str, limit: int | None = None, progress: bool = True, log=print) -> dict:
    """A finished lm run's coupled graph, its trained weights loaded, over a split of its text: perplexity per
    read node."""
    from .objectives import NextToken
    from .settings import load_run_config

    _, cfg = load_run_config(Path(run_dir))
    texts = load_text(cfg.eval_task or cfg.task, split, limit, cfg.columns)
    placed, _ = load_lm_run(run_dir, log, progress)
    try:
        placed.start_steps()
        return NextToken("coupled").evaluate(placed.graph, placed.graph, texts, placed.micro_batch, progress)
    finally:
        placed.stop_steps()
