"""`lowmem-graph`: train graphs of frozen language models, evaluate and ask them, plan their memory, inspect and
measure them. Mistakes a user can fix print one line and exit 2 (--debug: traceback)."""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import warnings
from pathlib import Path

from .errors import Interrupted, UserError
from .spec import FORMATS, PRESETS

# Errors of the machine a run writes to, not of our code: said in one line.
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                errno.EEXIST, errno.ENAMETOOLONG}


def _spec_from_args(args):
    """The graph of --preset or --graph, with the --set changes and --quant."""
    from .ablate import apply_changes
    from .spec import load_preset, load_spec

    spec = apply_changes(load_spec(args.graph) if args.graph else load_preset(args.preset or "tiny"), args.set or [])
    if args.quant:
        spec.quant = args.quant
    return spec


def _add_graph_args(p):
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", metavar="{" + ",".join(PRESETS) + "}", help="a shipped graph (default: tiny)")
    which.add_argument("--graph", help="a graph spec in YAML")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change the graph: latent_dim=512, nodes.phi3.blend=0.5, nodes.gemma.quant=int8, "
                        "drop=gemma (repeatable)")
    p.add_argument("--quant", choices=FORMATS, help="frozen weights of every node without its own "
                                                    "(default: the spec's, nf4)")


def _add_training_args(p):
    p.add_argument("--train-split", help="split trained on, for tasks that name none (default: train)")
    p.add_argument("--eval-split", help="split evaluated after each epoch (default: validation)")
    p.add_argument("--limit-train", type=int, help="at most N training questions per task part")
    p.add_argument("--limit-eval", type=int, help="at most N evaluation questions per task part")
    p.add_argument("--allow-test-training", action="store_true",
                   help="train on a test split (refused otherwise: every result measured on it would be contaminated)")
    p.add_argument("--epochs", type=int, help="passes over the training questions (default: the spec's, 3)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: the spec's, 3e-4)")


def _add_output_args(p, name: str):
    p.add_argument("--out", default="runs", help="where run folders go (default: runs/)")
    p.add_argument("--run-dir", help=f"exact run folder, new or empty (default: <out>/{name}-<time>)")


def _run_folder(args, name: str) -> Path:
    """--run-dir, or a new `<out>/<name>-<time>` folder: a second run never lands on the first."""
    from .distributed import current, on_main
    from .train import claim_run_dir, create_run_dir

    # under torchrun, rank 0 makes it and every rank takes that one
    return Path(on_main(lambda: str(claim_run_dir(args.run_dir) if args.run_dir else create_run_dir(args.out, name)),
                        current()))


def _training_parser(sub, name: str, help: str):
    """A subcommand that builds a graph and trains it: graph, data and training flags."""
    p = sub.add_parser(name, help=help)
    _add_graph_args(p)
    _add_data_args(p)
    _add_training_args(p)
    return p


def _add_data_args(p):
    p.add_argument("--task", help="arc-challenge, arc-easy, openbookqa, mmlu, a file or folder of your own "
                                  "(question, choices, answer), or hf:ORG/NAME[/CONFIG]; several joined by +; a "
                                  "task's own splits after a colon (mmlu:auxiliary_train,dev)")
    p.add_argument("--columns", help="for hf:ORG/NAME: which columns hold the question, choices and answer "
                                     "(question=q,choices=options.text,labels=options.label,answer=key)")
    p.add_argument("--eval-task", help="tasks evaluated (default: those of --task)")
    p.add_argument("--data-dir", help="official local files of the task (default: the hub; ARC-Easy is bundled)")
    p.add_argument("--batch-size", type=int, help="questions per optimizer step or per evaluation batch "
                                                  "(default: the spec's, 8)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train_overrides(args) -> dict:
    """Training settings given on the command line (they win over the spec's `train:` defaults)."""
    names = ["task", "eval_task", "data_dir", "train_split", "eval_split", "limit_train", "limit_eval", "epochs",
             "batch_size", "lr", "seed", "device", "checkpoint_every", "max_steps", "gpu_mem", "init", "init_anchor",
             "columns", "objective", "cache_dir"]
    overrides = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if getattr(args, "allow_test_training", False):
        overrides["allow_test_training"] = True
    return overrides


def _spec_and_config(args):
    """The graph (with --set changes and --quant) and its training settings (spec defaults + flags)."""
    from .train import TrainConfig

    spec = _spec_from_args(args)
    return spec, TrainConfig.from_dict({**spec.train, **_train_overrides(args)}, f"{spec.name}: train")


def cmd_train(args) -> None:
    from dataclasses import asdict

    from .memory.report import format_snapshot
    from .train import TrainConfig, load_run_config, train

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
    else:
        spec, cfg = _spec_and_config(args)
        run_dir = _run_folder(args, spec.name)
    if cfg.objective == "lm":
        from .lm import VARIANTS, comparison_table, train_lm

        if args.resume:
            raise UserError("--resume: a run with the lm objective does not resume yet; start it again")
        results = train_lm(spec, cfg, run_dir, VARIANTS if args.compare else ("coupled",),
                           progress=not args.no_progress)
        print(comparison_table(results))
        print(f"run folder: {run_dir}  (config.yaml, metrics.jsonl, lm-results.json, weights-*.safetensors, "
              "lm-curves.png" + (", lm-comparison.png)" if len(results) > 1 else ")"))
        return
    if args.compare:
        raise UserError("--compare runs the lm objective's baselines: add --objective lm")
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
    from .predict import TrainedGraph
    from .train import TrainConfig, load_questions, load_run_config

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit} (leave it out to evaluate every question)")
    run_dir = Path(args.run_dir)
    _, cfg = load_run_config(run_dir)
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
    from .data import load_file
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
    graph = TrainedGraph(args.run_dir, gpu_mem=args.gpu_mem, device=args.device, batch_size=args.batch_size,
                         progress=not args.no_progress)
    records = graph.predict(questions)
    stem = Path(args.input).stem if args.input else "question"
    out = write_jsonl(records, Path(args.out) if args.out else
                      Path(args.run_dir) / f"predictions-{stem}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
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
    from .predict import export_run

    out = export_run(args.run_dir, args.out)
    print(f"exported {args.run_dir} to {out} (config.yaml, trainable.safetensors, metrics.jsonl, README.md, "
          "export.json); load it with TrainedGraph or lowmem-graph predict")


def cmd_matrix(args) -> None:
    from .ablate import run_matrix

    spec, cfg = _spec_and_config(args)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected integers separated by commas") from None
    out = _run_folder(args, f"matrix-{spec.name}")
    run_matrix(spec, cfg, args.vary or [], seeds, out, progress=not args.no_progress)
    print(f"matrix: {out / 'matrix.md'}")


def cmd_baselines(args) -> None:
    from .baselines import run_baselines

    spec, cfg = _spec_and_config(args)
    run_baselines(spec, cfg, _run_folder(args, f"baselines-{spec.name}"), progress=not args.no_progress)


def cmd_figures(args) -> None:
    from .plots import plot_curves, plot_memory, plot_signals

    run_dir = Path(args.run_dir)
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


def cmd_inspect(args) -> None:
    from .summary import format_description

    spec = _spec_from_args(args)
    print(format_description(spec))
    if args.draw:
        from .drawing import draw
        from .topology import of_spec

        print(f"drawing: {draw(of_spec(spec), args.draw, f'graph {spec.name}')}")


def cmd_align(args) -> None:
    import shutil

    from .ridge import align_graph, pooled_states, write_alignment
    from .train import PlacedGraph, TrainConfig, load_questions

    spec = _spec_from_args(args)
    if args.limit is not None and args.limit < 5:
        raise UserError(f"--limit must be >= 5 (a Ridge map needs held-out folds), got {args.limit}")
    cfg = TrainConfig.from_dict({**spec.train, **{k: v for k, v in {"task": args.task, "data_dir": args.data_dir,
                                                                    "device": args.device, "gpu_mem": args.gpu_mem,
                                                                    "seed": args.seed, "columns": args.columns}.items()
                                                     if v is not None}})
    questions = load_questions(cfg.task, args.split, cfg.data_dir, args.limit, cfg.columns)
    other = (load_questions(args.cross_task, args.split, cfg.data_dir, args.limit, cfg.columns) if args.cross_task
             else None)
    if len(questions) < 10:
        raise UserError(f"{cfg.task} {args.split}: {len(questions)} questions; a held-out R^2 needs at least 10")
    run_dir = _run_folder(args, f"align-{spec.name}")
    try:
        placed = PlacedGraph(spec, cfg, log=print, progress=not args.no_progress)
        states = placed.frozen_states(*([questions] + ([other] if other else [])))
        pooled = pooled_states(placed.graph, states[0], questions)
        pooled_other = pooled_states(placed.graph, states[1], other) if other else None
        rows = align_graph(pooled, pooled_other, cfg.seed, progress=not args.no_progress)
        title = (f"{spec.name}: {cfg.task} {args.split}, {len(questions)} questions"
                 + (f"; second task {args.cross_task}" if other else ""))
        files = write_alignment(rows, run_dir, title)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    print(files[1].read_text())
    print("written: " + ", ".join(str(f) for f in files))


def cmd_probe_quant(args) -> None:
    import re
    import shutil

    import torch

    from .nodes import FrozenNode
    from .probe import default_texts, probe_node, read_texts, write_probe
    from .spec import NodeSpec
    from .train import TrainConfig

    if args.models and (args.preset or args.graph):
        raise UserError("give model paths or ids, or --preset/--graph, not both")
    if args.quant:
        raise UserError("probe-quant measures every format (full, int8, int4-g128, nf4): --quant does not apply")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.models:
        max_length = 512
        nodes = [(NodeSpec(name=re.sub(r"[^A-Za-z0-9_-]+", "-", Path(m).stem or m).strip("-") or "model",
                           model=m, role="reader"), ("output", -1)) for m in args.models]
    else:
        spec = _spec_from_args(args)
        max_length = spec.max_length
        nodes = [(n, ("output", None) if n.role == "reader" else ("input", None)) for n in spec.nodes]
    texts = read_texts(args.text, args.limit) if args.text else default_texts(args.limit or 64)
    device = TrainConfig(device=args.device or "auto").resolved_device()
    run_dir = _run_folder(args, "probe-quant")
    rows = []
    try:
        for node_spec, (kind, layer) in nodes:
            node = FrozenNode.load(node_spec, "bf16" if device.type == "cuda" else "fp32", device, max_length,
                                   logits=True)
            if layer is None:
                layer = node.read_layer if kind == "output" else node.inject_layer
            rows += probe_node(node, texts, (kind, layer % node.n_layers), args.batch_size, not args.no_progress)
            del node
            if device.type == "cuda":
                torch.cuda.empty_cache()
        files = write_probe(rows, run_dir, args.threshold)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    print(files[1].read_text())
    print(f"{len(texts)} texts; written: " + ", ".join(str(f) for f in files))


def cmd_plan(args) -> None:
    from .memory.budget import parse_budgets, parse_size
    from .memory.report import format_plan
    from .memory.search import make_plan

    spec = _spec_from_args(args)
    host = parse_size(args.host_mem) if args.host_mem else None
    plan = make_plan(spec, parse_budgets(args.gpu_mem), args.batch, args.seq, host)
    print(format_plan(plan, spec))


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="lowmem-graph", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"lowmem-graph {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a graph (default: the tiny preset on bundled ARC-Easy, CPU-friendly)")
    _add_graph_args(p)
    _add_data_args(p)
    _add_training_args(p)
    p.add_argument("--seed", type=int, help="seed of the trainable parts' initialisation and the data order")
    p.add_argument("--gpu-mem", metavar="SIZE", help="device memory budget, e.g. 24G or 6G: plan what stays resident, "
                                                     "what streams, and the micro-batch (see `lowmem-graph plan`)")
    p.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps")
    p.add_argument("--cache-dir", help="where the prefix cache lives (default: ~/.cache/lowmem-graph/prefix)")
    p.add_argument("--init", choices=["random", "ridge"],
                   help="ridge: start the projections as Ridge maps into an anchor node's principal directions")
    p.add_argument("--init-anchor", metavar="NODE", help="the anchor for --init ridge (default: the first refiner)")
    p.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after N steps")
    p.add_argument("--objective", choices=["choice", "lm"],
                   help="choice: score answer options (default) | lm: next-token prediction on text, perplexity "
                        "(graphs given by edges; text: openbook-facts, a .txt/.jsonl file or hf:ORG/NAME)")
    p.add_argument("--compare", action="store_true",
                   help="with --objective lm: also each model alone and a learned router over their outputs, "
                        "under the same protocol")
    _add_output_args(p, "<graph>")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="let --resume change batch size, epochs or lr (they reinterpret the step counter)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's trained weights: accuracy with a 95%% interval")
    p.add_argument("run_dir")
    _add_data_args(p)
    p.add_argument("--split", default="test", help="split evaluated (default: test)")
    p.add_argument("--limit", type=int, help="at most N questions per task part")
    p.add_argument("--out", help="predictions file (default: in the run folder)")
    p.add_argument("--gpu-mem", metavar="SIZE", help="device memory budget (default: the run's own, if it had one)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="ask a trained graph: the chosen answer and every choice's probability")
    p.add_argument("run_dir", help="a run folder, or one made by `lowmem-graph export`")
    p.add_argument("--input", metavar="FILE", help="questions: JSONL or CSV (question, choices, optional answer, "
                                                   "id, context) or ARC's JSONL")
    p.add_argument("--question", help="one question, asked on the command line")
    p.add_argument("--choices", nargs="+", metavar="TEXT", help="its choices (with --question)")
    p.add_argument("--context", help="a passage shown before the question (with --question)")
    p.add_argument("--out", metavar="FILE", help="predictions JSONL (default: in the run folder)")
    p.add_argument("--gpu-mem", metavar="SIZE", help="device memory budget (default: the run's own, if it had one)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, help="questions per forward (default: the run's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("cache", help="list the prefix and node caches with their sizes, or clear them")
    p.add_argument("--clear", choices=["prefix", "nodes", "tiny", "llama2c", "all"], help="remove every entry of one kind")
    p.add_argument("--all", action="store_true", help="list every entry (default: the first 20 of each kind)")
    p.add_argument("--cache-dir", help="the cache root (default: $LOWMEM_GRAPH_CACHE or ~/.cache/lowmem-graph)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("export", help="a run as a self-describing folder: config, weights, a model card")
    p.add_argument("run_dir")
    p.add_argument("out", help="the new folder")
    p.set_defaults(func=cmd_export)

    p = _training_parser(sub, "matrix", "train ablation variants x seeds and tabulate mean and spread")
    p.add_argument("--vary", action="append", metavar="KEY=V1,V2",
                   help="an axis of the matrix, e.g. nodes.phi3.inject_depth=0.5,0.75 or drop=llama,qwen (repeatable)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    _add_output_args(p, "matrix-<graph>")
    p.set_defaults(func=cmd_matrix)

    p = _training_parser(sub, "baselines", "each node zero-shot (acc, acc_norm, acc_bytes) and as a "
                                           "parameter-matched learned head")
    _add_output_args(p, "baselines-<graph>")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("figures", help="redraw a run's plots: curves, memory, gradient share and routing")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("inspect", help="nodes, widths, injection sites and parameter counts (no download)")
    _add_graph_args(p)
    p.add_argument("--draw", metavar="PNG", help="also draw the graph (nodes, latents, edges, output) into PNG")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="fit a graph to a device memory budget: residency, streaming, micro-batch "
                                    "(no download)")
    _add_graph_args(p)
    p.add_argument("--gpu-mem", required=True, help="device memory budget: 24G, 6GiB, 512M, ... (G = 2**30 bytes)")
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=8,
                   help="examples per optimizer step (default 8)")
    p.add_argument("--seq-len", "--seq", dest="seq", type=int, default=512, help="tokens per example (default 512)")
    p.add_argument("--host-mem", help="host memory to plan for (default: what this machine has available now)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("align", help="how well the nodes' spaces line up: Ridge maps between every pair, held-out R^2 "
                                     "beside a permutation control")
    _add_graph_args(p)
    p.add_argument("--task", help="questions whose states are aligned (default: the spec's training task)")
    p.add_argument("--split", default="train", help="split whose states are aligned (default: train)")
    p.add_argument("--limit", type=int, help="at most N questions per task part")
    p.add_argument("--cross-task", help="a second task: the maps fitted on --task, scored on it")
    p.add_argument("--columns", help="for hf:ORG/NAME tasks: question=...,choices=...,answer=...")
    p.add_argument("--data-dir", help="official local files of the task (default: the hub; ARC-Easy is bundled)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--gpu-mem", metavar="SIZE", help="device memory budget for the frozen pass (as train's)")
    p.add_argument("--seed", type=int, help="seed of the folds and the permutation control")
    _add_output_args(p, "align-<graph>")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("probe-quant", help="what INT8, INT4 and NF4 cost each node: perplexity and hidden-state error "
                                           "against full precision")
    p.add_argument("models", nargs="*", help="model ids or paths (or --preset/--graph for every node of a graph)")
    _add_graph_args(p)
    p.add_argument("--text", help="a UTF-8 file, one text per line (default: the bundled questions and answers)")
    p.add_argument("--limit", type=int, help="at most N texts (default 64 of the bundled ones)")
    p.add_argument("--threshold", type=float, default=10.0, help="flag a node whose NF4 perplexity gap exceeds this "
                                                                  "many percent (default 10)")
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward (default 8)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    _add_output_args(p, "probe-quant")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_probe_quant)

    from .reproduce import add_reproduce_command

    add_reproduce_command(sub)
    for command in sub.choices.values():      # --debug also after the subcommand; SUPPRESS keeps a --debug before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def quiet_warnings() -> None:
    """Hide the libraries' warnings (deprecations, hub notices: noise to a user of the command) but not ours, which
    say something about this run (a slab streamed from pageable memory, a damaged cache rebuilt)."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"lowmem_graph(\.|$)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.debug:
        quiet_warnings()
    from .distributed import finish

    try:
        args.func(args)
        finish()            # under torchrun: the process group ends cleanly
    except UserError as e:
        if args.debug:
            raise
        print(f"lowmem-graph: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"lowmem-graph: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:         # `lowmem-graph cache | head`: the reader left; no traceback, the shell's code
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if args.debug or e.errno not in _ENVIRONMENT:
            raise
        hint = {errno.ENOSPC: " (the disk is full)", errno.EDQUOT: " (disk quota exceeded)",
                errno.EROFS: " (read-only file system)"}.get(e.errno, "")
        print(f"lowmem-graph: error: {e.strerror}{hint}: {e.filename or ''}", file=sys.stderr)
        return 2
    except MemoryError:
        if args.debug:
            raise
        print("lowmem-graph: error: out of host memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowmem-graph: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
