"""`reproduce --source residual-coupling`: the comparison of "Scaling LLMs horizontally: hidden-state coupling
without weight modification" (Residual Coupling, r/MachineLearning), run as its coding test is described: each
model alone, a learned router over their outputs (the source's MoE) and the models coupled by bridges, trained
under one budget on next-token prediction (lm.train_lm, as `train --compare`), our perplexities printed beside the
source's. Its medical and TruthfulQA figures are listed, not run: the source names neither those models nor their
data."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

# The source's perplexities per variant: each model alone, its MoE router, Residual Coupling.
SOURCE = {
    "coding": {"setup": "GPT-2 + CodeGPT-small-py", "alone": 7e6, "router": 878.0, "coupled": 5.91,
               "note": "alone is \"a 7-million baseline perplexity on mismatched text\", caused by the two tokenizers"},
    "medical": {"setup": "3 models, not named", "alone": 57.08, "router": 56.80, "coupled": 11.02,
                "note": "not run here: the source does not name the models or the text"},
}
NOT_RUN = ["TruthfulQA health MC1: +9.1 points over the baseline (the source does not name the models)"]


def reproduce_rc(spec, cfg, run_dir: Path, progress: bool = True, log=print) -> Path:
    """The three variants under one protocol in `run_dir`, then results.md and results.json beside lm.py's files."""
    from .lm import VARIANTS, train_lm

    results = train_lm(spec, cfg, run_dir, VARIANTS, progress=progress, log=log)
    if len(results) < len(VARIANTS):        # stopped (Ctrl-C, SIGTERM) with a checkpoint
        raise UserError(f"the run stopped before its three variants finished ({', '.join(results) or 'none'} "
                        f"done): `lowmem-graph train --resume {run_dir}` finishes them")
    return write_rc_results(results, spec, cfg, Path(run_dir))


def rc_table(results: dict, spec, cfg) -> list[str]:
    """Markdown: one row per variant, each node's perplexity on the held-out text, and the source's figures."""
    nodes = list(results["coupled"]["perplexity"])
    source = SOURCE["coding"]
    lines = [f"# Residual Coupling's comparison: graph `{spec.name}` ({spec.quant}), text `{cfg.task}`", "",
             f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)}, batch {cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed}, "
             "the same for every variant. Ours: each model's perplexity on the held-out text, predicting its own "
             "tokens. The source's: one figure per variant, its setups in its own words.", "",
             "| variant | trainable | " + " | ".join(f"ours: {n}" for n in nodes)
             + f" | source, coding: {source['setup']} | source, medical |",
             "|---|---|" + "---|" * len(nodes) + "---|---|"]
    for variant, r in results.items():
        ours = " | ".join(f"{r['perplexity'][n]:.2f}" for n in nodes)
        lines.append(f"| {variant} | {r['trainable']:,} | {ours} | {_figure(source[variant])} | "
                     f"{_figure(SOURCE['medical'][variant])} |")
    lines += ["", f"Source, coding: {source['note']}. Source, medical: {SOURCE['medical']['note']}.",
              *(f"Not run: {what}." for what in NOT_RUN)]
    return lines


def _figure(x: float) -> str:
    return f"{x / 1e6:.0f} million" if x >= 1e6 else f"{x:.2f}"


def write_rc_results(results: dict, spec, cfg, run_dir: Path) -> Path:
    from dataclasses import asdict

    from .files import atomic_file

    lines = rc_table(results, spec, cfg)
    out = run_dir / "results.md"
    with atomic_file(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_file(run_dir / "results.json") as tmp:
        tmp.write_text(json.dumps({"graph": spec.name, "train": asdict(cfg), "ours": results, "source": SOURCE,
                                   "not_run": NOT_RUN}, indent=1))
    print("\n".join(lines))
    return out


def cmd_reproduce_rc(args) -> None:
    """The protocol from `reproduce`'s flags: --preset (default rc-coding) or --graph, --task, the limits."""
    from .commands import _spec_from_args
    from .lm import VARIANTS, check_lm
    from .settings import kept_if_started
    from .train import TrainConfig, claim_run_dir, create_run_dir

    for flag, given in (("--tasks", args.tasks), ("--data-dir", args.data_dir), ("--gpu-mem", args.gpu_mem),
                        ("--protocol", args.protocol != args.paper_protocol)):
        if given:
            raise UserError(f"{flag} is the paper's protocol's; --source residual-coupling takes --preset or "
                            "--graph, --task and the limits")
    spec = _spec_from_args(args, "rc-coding")
    flags = {"task": args.task, "limit_train": args.limit_train, "limit_eval": args.limit_test, "epochs": args.epochs,
             "batch_size": args.batch_size, "device": args.device}
    cfg = TrainConfig.from_dict({**spec.train, "objective": "lm", "compare": True,
                                 **{k: v for k, v in flags.items() if v is not None}}, f"{spec.name}: train")
    cfg.check_graph(spec)
    check_lm(spec, cfg, VARIANTS)
    run_dir = claim_run_dir(args.run_dir) if args.run_dir else create_run_dir(args.out, f"reproduce-rc-{spec.name}")
    with kept_if_started(run_dir):
        out = reproduce_rc(spec, cfg, run_dir, progress=not args.no_progress)
    print(f"results: {out}")
