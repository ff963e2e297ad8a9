"""The `lowmem-graph` subcommands, one function each (`cmd_train`, `cmd_plan`, ...), given the parsed arguments;
the parser and the entry point are cli.py's. Everything heavy is imported inside the command that needs it, so
`lowmem-graph --help` stays quick."""
from __future__ import annotations

import time
from pathlib import Path

from .errors import UserError


def _spec_from_args(args, preset: str = "tiny"):
    """The graph of --preset (default `preset`) or --graph (read by settings.load_config, the one reader of a config
    file), with the --set changes and --quant."""
    from .ablate import apply_changes
    from .settings import load_config
    from .spec import load_preset

    spec = apply_changes(load_config(args.graph) if args.graph else load_preset(args.preset or preset), args.set or [])
    if args.quant:
        spec.quant = args.quant
    return spec


def _run_folder(args, name: str) -> Path:
    """--run-dir, or a new `<out>/<name>-<time>` folder: a second run never lands on the first."""
    from .distributed import current, on_main
    from .train import claim_run_dir, create_run_dir

    # under torchrun, rank 0 makes it and every rank takes that one
    return Path(on_main(lambda: str(claim_run_dir(args.run_dir) if args.run_dir else create_run_dir(args.out, name)),
                        current()))


def _train_overrides(args) -> dict:
    """Training settings given on the command line (they win over the spec's `train:` defaults)."""
    names = ["task", "eval_task", "data_dir", "train_split", "eval_split", "limit_train", "limit_eval", "epochs",
             "batch_size", "lr", "seed", "device", "checkpoint_every", "max_steps", "gpu_mem", "init", "init_anchor",
             "init_from", "train_only", "columns", "objective", "cache_dir", "report_to", "host_mem"]
    overrides = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if getattr(args, "allow_test_training", False):
        overrides["allow_test_training"] = True
    if getattr(args, "compare", False):
        overrides["compare"] = True
    return overrides


def _spec_and_config(args):
    """The graph (with --set changes and --quant) and its training settings (spec defaults + flags)."""
    spec = _spec_from_args(args)
    return spec, _config(spec, _train_overrides(args))


def _config(spec, overrides: dict):
    """The spec's `train:` defaults, checked on their own (a bad one is a mistake even where a flag overrides
    it), with `overrides` over them."""
    from .train import TrainConfig

    where = f"{spec.name}: train"
    TrainConfig.from_dict(spec.train, where, whole=False)
    return TrainConfig.from_dict({**spec.train, **overrides}, where)


def cmd_train(args) -> None:
    from dataclasses import asdict

    from .settings import TrainConfig, kept_if_started, load_run_config

    overrides = _train_overrides(args)
    if args.resume:
        if args.graph or args.preset or args.quant or args.set:
            raise UserError("--resume takes the graph from the run folder; drop --graph/--preset/--quant/--set")
        run_dir = Path(args.resume)
        spec, cfg = load_run_config(run_dir)
        changed = {k: (getattr(cfg, k), overrides[k]) for k in ("batch_size", "epochs", "lr")
                   if k in overrides and overrides[k] != getattr(cfg, k)}
        if changed and not args.allow_changed_settings:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise UserError(f"--resume with {what}: the run's step counter and schedule were made for the old "
                            "settings; add --allow-changed-settings to change them anyway")
        cfg = TrainConfig.from_dict({**asdict(cfg), "max_steps": None, **overrides})   # a stop is not sticky
        _check_before_folder(spec, cfg)
        _train_in(args, spec, cfg, run_dir)
        return
    spec, cfg = _spec_and_config(args)
    _check_before_folder(spec, cfg)
    run_dir = _run_folder(args, spec.name)
    with kept_if_started(run_dir):
        _train_in(args, spec, cfg, run_dir)


def _check_before_folder(spec, cfg) -> None:
    """What refuses a training run without loading anything, before its folder is made."""
    cfg.check_graph(spec)
    if cfg.objective == "lm":
        from .lm import VARIANTS, check_lm

        check_lm(spec, cfg, VARIANTS if cfg.compare else ("coupled",))


def _train_in(args, spec, cfg, run_dir: Path) -> None:
    """Train (or resume) in `run_dir` and say how it went."""
    from .memory.report import format_snapshot
    from .train import train

    if cfg.objective == "lm":
        from .distributed import current
        from .lm import VARIANTS, comparison_table, train_lm

        results = train_lm(spec, cfg, run_dir, VARIANTS if cfg.compare else ("coupled",),
                           progress=not args.no_progress, resume=bool(args.resume))
        if not current().main or len(results) < (3 if cfg.compare else 1):     # another rank, or stopped
            return
        print(comparison_table(results))
        print(f"run folder: {run_dir}  (config.yaml, metrics.jsonl, lm-results.json, weights-*.safetensors, "
              "lm-curves.png" + (", lm-comparison.png)" if len(results) > 1 else ")"))
        return
    summary = train(spec, cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    from .distributed import current

    if "stopped_at_step" in summary or not current().main:
        return
    lo, hi = summary["eval_ci"]
    print(f"done: {cfg.eval_split} accuracy {summary['eval_acc']:.3f} (95% CI {lo:.3f}-{hi:.3f}) after "
          f"{summary['steps']} steps; {format_snapshot(summary['memory'])}")
    print(f"run folder: {run_dir}  (config.yaml, metrics.jsonl, trainable.safetensors, curves.png, memory.png, "
          "signals.png)")


def cmd_eval(args) -> None:
    from dataclasses import asdict

    from .evaluate import predictions_name, write_predictions
    from .predict import TrainedGraph, graph_folder
    from .train import TrainConfig, load_questions, load_run_config

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit} (leave it out to evaluate every question)")
    run_dir = graph_folder(args.run_dir)
    _, cfg = load_run_config(run_dir)
    if cfg.objective == "lm" and (args.task or args.eval_task):      # multiple choice by log-likelihood
        from .lm_choices import report_choices

        report_choices(run_dir, args.eval_task or args.task, args.split, args.data_dir, args.limit, args.columns,
                       args.batch_size, progress=not args.no_progress, device=args.device)
        return
    if cfg.objective == "lm":
        from .lm import evaluate_run

        split = "validation" if args.split == "test" and not cfg.task.startswith("hf:") else args.split
        ppl = evaluate_run(run_dir, split, args.limit, progress=not args.no_progress)
        print(f"{cfg.task} {split}: perplexity " + ", ".join(f"{j} {v:.2f}" for j, v in ppl.items()))
        return
    overrides = {k: v for k, v in {"eval_task": args.eval_task or args.task, "data_dir": args.data_dir,
                                   "columns": args.columns}.items() if v is not None}
    cfg = TrainConfig.from_dict({**asdict(cfg), **overrides})
    questions = load_questions(cfg.evaluated(), args.split, cfg.data_dir, args.limit, cfg.columns)
    from .distributed import current

    main_rank = current().main      # under torchrun: every rank scores its slice, rank 0 writes and prints
    graph = TrainedGraph(run_dir, gpu_mem=args.gpu_mem, device=args.device, batch_size=args.batch_size,
                         progress=not args.no_progress and main_rank,
                         log=print if main_rank else (lambda *_: None))       # the run's --gpu-mem plan too
    result = graph.evaluate(questions)
    if not main_rank:
        return
    out = write_predictions(result, Path(args.out) if args.out else
                            run_dir / predictions_name(cfg.evaluated(), args.split))
    print(f"{cfg.evaluated()} {args.split}: {result.summary()}")
    print("routing share per refiner: " + ", ".join(f"{j} {s:.3f}" for j, s in zip(graph.refiners, result.routing)))
    print(f"predictions: {out}")


def cmd_predict(args) -> None:
    import contextlib
    import tempfile

    from .questions import load_file
    from .predict import TrainedGraph, format_answer, write_jsonl

    if (args.input is None) == (args.question is None):
        raise UserError("give --input FILE or --question TEXT with --choices, not both or neither")
    if args.question is not None:
        if not args.choices or len(args.choices) < 2:
            raise UserError("--question needs at least two --choices")
        questions = [{"id": "question", "question": args.question, "choices": args.choices,
                      "context": args.context or ""}]
    else:
        if args.choices or args.context:
            raise UserError("--choices and --context go with --question; --input FILE holds its own")
        questions = load_file(args.input, need_answer=False)
    # A question asked on the command line is asked once: its frozen states go to a prefix cache that goes with it.
    with tempfile.TemporaryDirectory(prefix="lowmem-graph-question-") if args.question is not None else \
            contextlib.nullcontext() as one_off:
        graph = TrainedGraph(args.run_dir, gpu_mem=args.gpu_mem, device=args.device, batch_size=args.batch_size,
                             progress=not args.no_progress, cache_dir=one_off)
        records = graph.predict(questions)
    stem = Path(args.input).stem if args.input else "question"
    out = write_jsonl(records, Path(args.out) if args.out else
                      graph.run_dir / f"predictions-{stem}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    if len(records) <= 20:
        print("\n\n".join(format_answer(r) for r in records))
    else:
        for r in records:
            verdict = "" if "label" not in r else f"  (right: {r['label']})"
            print(f"{r['id']}: {r['answer']}  p = {r['probs'][r['answer']]:.3f}{verdict}")
    scored = [r for r in records if "label" in r]
    if scored:
        print(f"{sum(r['correct'] for r in scored)}/{len(scored)} right where the answer was given")
    print(f"predictions: {out}")


def cmd_generate(args) -> None:
    from .generate import stream

    stream(args.run_dir, args.prompt, node=args.node, variant=args.variant, max_new_tokens=args.max_new_tokens,
           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop=tuple(args.stop), seed=args.seed,
           device=args.device)


def cmd_cache(args) -> None:
    from datetime import datetime

    from .cache import CACHE_KINDS, cache_usage, clear_cache
    from .memory.report import format_mib
    from .tiny import cache_root

    root = Path(args.cache_dir) if args.cache_dir else cache_root()
    if args.clear:
        entries, freed = clear_cache(root, args.clear)
        print(f"cleared {args.clear} under {root}: {entries} entries, {format_mib(freed)} freed")
        return
    rows = cache_usage(root)
    print(f"cache root: {root} (LOWMEM_GRAPH_CACHE overrides it)")
    for kind, what in CACHE_KINDS.items():
        mine = [r for r in rows if r[0] == kind]
        print(f"\n{kind}/  {len(mine)} entries, {format_mib(sum(r[2] for r in mine))}  ({what})")
        for _, name, size, mtime in mine if args.all or len(mine) <= 20 else mine[:20]:
            print(f"  {format_mib(size):>12}  {datetime.fromtimestamp(mtime):%Y-%m-%d %H:%M}  {name}")
        if len(mine) > 20 and not args.all:
            print(f"  ... {len(mine) - 20} more (--all lists them)")
    print(f"\ntotal {format_mib(sum(r[2] for r in rows))}; lowmem-graph cache --clear prefix|nodes|tiny|llama2c|all "
          "frees it (a cleared entry is rebuilt when needed)")


def cmd_export(args) -> None:
    from .predict import export_command

    export_command(args)


def cmd_matrix(args) -> None:
    from .ablate import run_matrix
    from .settings import kept_if_started

    spec, cfg = _spec_and_config(args)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        seeds = [-1]
    if not all(0 <= s < 2 ** 32 for s in seeds):
        raise UserError(f"--seeds {args.seeds!r}: expected integers in [0, 2**32) separated by commas")
    out = _run_folder(args, f"matrix-{spec.name}")
    with kept_if_started(out):
        run_matrix(spec, cfg, args.vary or [], seeds, out, progress=not args.no_progress)
    print(f"matrix: {out / 'matrix.md'}")


def cmd_baselines(args) -> None:
    from .baselines import run_baselines
    from .settings import kept_if_started

    spec, cfg = _spec_and_config(args)
    out = _run_folder(args, f"baselines-{spec.name}")
    with kept_if_started(out):
        table = run_baselines(spec, cfg, out, progress=not args.no_progress)
    print(f"written: {table}, {table.with_suffix('.json')} (zero-shot-<node>.jsonl and head-<node>/ beside them)")


def cmd_figures(args) -> None:
    from .plots import plot_curves, plot_memory, plot_signals

    from .files import check_links

    run_dir = Path(args.run_dir)
    check_links(run_dir)        # the figures are read from, and written into, this folder alone
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir} is not a run folder (no metrics.jsonl)")
    plan = None
    if (run_dir / "config.yaml").is_file():
        from .memory.budget import parse_size
        from .memory.search import make_plan
        from .train import load_run_config

        spec, cfg = load_run_config(run_dir)
        if cfg.objective == "lm":
            import json

            from .lm import plot_comparison, plot_lm_curves

            print(plot_lm_curves(metrics, run_dir / "lm-curves.png", spec.name))
            results = run_dir / "lm-results.json"
            if results.is_file() and len(json.loads(results.read_text())) > 1:
                print(plot_comparison(json.loads(results.read_text()), run_dir / "lm-comparison.png", spec.name))
            return
        if cfg.gpu_mem:         # the run's plan, made again (it depends on the spec and settings alone)
            try:
                plan = make_plan(spec, parse_size(cfg.gpu_mem), cfg.batch_size, spec.max_length)
            except UserError:   # this machine cannot host it: the plot says the peak was not given
                plan = None
    print(plot_curves(metrics, run_dir / "curves.png"))
    print(plot_memory(metrics, run_dir / "memory.png", plan=plan))
    print(plot_signals(metrics, run_dir / "signals.png"))
