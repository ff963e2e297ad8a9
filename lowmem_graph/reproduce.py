"""Reproduce "Dead Weights, Live Signals": train the paper's graph under its protocol, test on three benchmarks,
and write the results beside the paper's numbers.

The paper trained on ARC-Challenge train, OpenBookQA train and 14,042 MMLU rows: exactly the size of MMLU's
*test* split. We draw the same number from MMLU's auxiliary_train/dev/validation instead, so no test question
is trained on, and evaluate on the three test splits.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .spec import FORMATS

if TYPE_CHECKING:       # training imports torch: not at --help's import time
    from .settings import TrainConfig

# The paper's reported accuracies (%): the graph, its best single constituent, a parameter-matched learned head.
PAPER = {
    "arc-challenge": {"graph": 87.3, "best_single": 75.9, "learned_head": 78.2},
    "openbookqa": {"graph": 82.8, "best_single": 76.6, "learned_head": 77.6},
    "mmlu": {"graph": 67.2, "best_single": 66.0, "learned_head": 60.5},
}


@dataclass
class Protocol:
    """A reproduction protocol file: which graph, its training settings, the benchmarks tested."""

    preset: str | None = None
    train: dict | None = None
    benchmarks: list | None = None


def load_protocol(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"protocol file not found: {path}")
    from .spec import read_yaml

    from .spec import typed_fields

    raw = read_yaml(path) or {}
    return {k: v for k, v in typed_fields(Protocol, raw, str(path), "key").items() if v is not None}


def reproduce(spec, cfg: TrainConfig, benchmarks: list[str], run_dir: str | Path, limit_test: int | None = None,
              progress: bool = True, log=print) -> Path:
    """Train, then test each benchmark (those whose data cannot be loaded are reported, not hidden; a name
    starting with '-' was excluded by the user and is listed as not run)."""
    from .evaluate import evaluate, write_predictions
    from .train import load_questions, train

    run_dir = Path(run_dir)
    summary = train(spec, cfg, run_dir, progress=progress, log=log)
    trainer = summary.pop("trainer")
    trainer.end_training()          # the test sets' frozen passes follow
    rows = []
    for bench in benchmarks:
        if bench.startswith("-"):
            rows.append({"benchmark": bench[1:], "status": "not run (excluded by --tasks)"})
            continue
        try:
            questions = load_questions(bench, "test", cfg.data_dir, limit_test)
        except UserError as e:
            rows.append({"benchmark": bench, "status": f"not run: {e}"})
            continue
        (states,) = trainer.placed.frozen_states(questions) if trainer.train_states is not None else (None,)
        trainer.placed.start_steps()
        result = evaluate(trainer.graph, questions, trainer.micro_batch, progress, f"test {bench}", states)
        write_predictions(result, run_dir / f"predictions-{bench}-test.jsonl")
        rows.append({"benchmark": bench, "status": "ok", "accuracy": result.accuracy,
                     "interval": list(result.interval), "n": result.n,
                     "routing": dict(zip(trainer.graph.refiners, result.routing))})
        log(f"test {bench}: {result.summary()}")
    trainer.close()
    return write_results(rows, spec, cfg, run_dir)


def write_results(rows: list[dict], spec, cfg: TrainConfig, run_dir: Path) -> Path:
    from .files import atomic_file

    lines = [f"# Results: graph `{spec.name}` ({spec.quant}), trained on `{cfg.task}`", "",
             f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)}, batch {cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed}. "
             "Accuracy on each test split with its 95% Wilson interval; the paper's numbers beside them (single runs, "
             "fp16 models).", "",
             "| benchmark | ours | 95% CI | n | paper: graph | paper: best single model | paper: learned head |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        paper = PAPER.get(row["benchmark"], {})
        ref = " | ".join(f"{paper[k]:.1f}" if k in paper else "-" for k in ("graph", "best_single", "learned_head"))
        if row["status"] == "ok":
            lo, hi = row["interval"]
            lines.append(f"| {row['benchmark']} | {100 * row['accuracy']:.1f} | {100 * lo:.1f}-{100 * hi:.1f} | "
                         f"{row['n']} | {ref} |")
        else:
            lines.append(f"| {row['benchmark']} | {row['status']} | | | {ref} |")
    out = run_dir / "results.md"
    with atomic_file(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_file(run_dir / "results.json") as tmp:
        tmp.write_text(json.dumps({"graph": spec.name, "train": asdict(cfg), "rows": rows, "paper": PAPER}, indent=1))
    print("\n".join(lines))
    return out


PAPER_PROTOCOL = str(Path(__file__).parent / "presets" / "reproduce_paper.yaml")


def add_reproduce_command(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="the paper's protocol: train, test on ARC-C/OBQA/MMLU, compare "
                                                "(or --source residual-coupling)")
    p.add_argument("--source", choices=("paper", "residual-coupling"), default="paper",
                   help="paper (default): Dead Weights, Live Signals; residual-coupling: each model alone, a router "
                        "and the coupled graph on next-token prediction (preset rc-coding), beside the source's "
                        "perplexities")
    p.add_argument("--protocol", default=PAPER_PROTOCOL,
                   help="YAML with preset, train settings and benchmarks (default: the paper's)")
    p.add_argument("--preset", help="override the protocol's graph (tiny runs on CPU)")
    p.add_argument("--graph", help="a graph spec in YAML instead of the preset")
    p.add_argument("--data-dir", help="official local files (ARC, OpenBookQA, MMLU tree); default: the hub")
    p.add_argument("--tasks", help="only these benchmarks, comma-separated (e.g. arc-challenge,openbookqa when no "
                                   "MMLU files are at hand); the others are listed as not run")
    p.add_argument("--task", help="residual-coupling: the text (a .txt/.jsonl file, hf:ORG/NAME, openbook-facts); "
                                  "default: the graph's")
    p.add_argument("--limit-train", type=int,
                   help="at most N training questions per task (passages: residual-coupling)")
    p.add_argument("--limit-test", type=int, help="at most N test questions per benchmark (held-out passages: "
                                                  "residual-coupling)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change the graph: latent_dim=512, nodes.phi3.blend=0.5, nodes.gemma.quant=int8, "
                        "drop=gemma (repeatable)")
    p.add_argument("--quant", choices=FORMATS, help="frozen weights of every node without its own (default: nf4)")
    p.add_argument("--epochs", type=int, help="passes over the training questions (default: the protocol's)")
    p.add_argument("--batch-size", type=int, help="questions per optimizer step (default: the protocol's)")
    p.add_argument("--gpu-mem", metavar="SIZE", help="device memory budget, e.g. 24G (see `lowmem-graph plan`)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--out", default="runs", help="where run folders go (default: runs/)")
    p.add_argument("--run-dir", help="exact run folder, new or empty (default: <out>/reproduce-<graph>-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce, paper_protocol=PAPER_PROTOCOL)


def cmd_reproduce(args) -> None:
    if args.source == "residual-coupling":
        from .reproduce_rc import cmd_reproduce_rc

        cmd_reproduce_rc(args)
        return
    if args.task:
        raise UserError("--task is --source residual-coupling's; the paper's protocol takes --tasks")
    from .commands import _spec_from_args
    from .train import TrainConfig, claim_run_dir, create_run_dir

    protocol = load_protocol(args.protocol)
    spec = _spec_from_args(args, protocol.get("preset", "paper"))
    flags = {"data_dir": args.data_dir, "limit_train": args.limit_train, "epochs": args.epochs, "device": args.device,
             "batch_size": args.batch_size, "gpu_mem": args.gpu_mem}
    cfg = TrainConfig.from_dict({**spec.train, **protocol.get("train", {}),
                                 **{k: v for k, v in flags.items() if v is not None}}, f"{args.protocol}: train")
    benchmarks = protocol.get("benchmarks", list(PAPER))
    if args.tasks:
        keep = [t.strip() for t in args.tasks.split(",")]
        unknown = [t for t in keep if t not in benchmarks]
        if unknown:
            raise UserError(f"--tasks: {', '.join(unknown)} not among the protocol's benchmarks {benchmarks}")
        cfg.task = "+".join(p for p in cfg.task.split("+") if p.partition(":")[0] in keep)
        cfg.eval_task = "+".join(t for t in cfg.evaluated().split("+") if t in keep)
        benchmarks = [b if b in keep else f"-{b}" for b in benchmarks]
    if args.limit_train is not None:
        cfg.limit_eval = min(cfg.limit_eval or args.limit_train, args.limit_train)
    run_dir = claim_run_dir(args.run_dir) if args.run_dir else create_run_dir(args.out, f"reproduce-{spec.name}")
    out = reproduce(spec, cfg, benchmarks, run_dir, args.limit_test, progress=not args.no_progress)
    print(f"results: {out}")
