"""The subcommands that look at a graph before (or instead of) training it: `inspect` (its shape, drawn), `plan`
(how it fits a memory budget, and how fast), `align` (how well its readers' states line up) and `probe-quant`
(what 4-bit costs each node). The training and run commands are commands.py's; the parser is cli.py's."""
from __future__ import annotations

from pathlib import Path

from .commands import _config, _run_folder, _spec_from_args
from .errors import UserError


def cmd_inspect(args) -> None:
    from .summary import format_description

    spec = _spec_from_args(args)
    print(format_description(spec))
    if args.draw:
        from .drawing import draw
        from .topology import of_spec

        print(f"drawing: {draw(of_spec(spec), args.draw, f'graph {spec.name}')}")


def cmd_align(args) -> None:
    from .ridge import align_graph, pooled_states, write_alignment
    from .settings import kept_if_started
    from .train import PlacedGraph, load_questions

    spec = _spec_from_args(args)
    if args.limit is not None and args.limit < 5:
        raise UserError(f"--limit must be >= 5 (a Ridge map needs held-out folds), got {args.limit}")
    cfg = _config(spec, {k: v for k, v in {"task": args.task, "data_dir": args.data_dir, "device": args.device,
                                           "gpu_mem": args.gpu_mem, "seed": args.seed, "columns": args.columns}.items()
                         if v is not None})
    questions = load_questions(cfg.task, args.split, cfg.data_dir, args.limit, cfg.columns)
    other = (load_questions(args.cross_task, args.split, cfg.data_dir, args.limit, cfg.columns) if args.cross_task
             else None)
    if len(questions) < 10:
        raise UserError(f"{cfg.task} {args.split}: {len(questions)} questions; a held-out R^2 needs at least 10")
    run_dir = _run_folder(args, f"align-{spec.name}")
    with kept_if_started(run_dir, resumable=False):     # nothing to resume: any failure removes it
        placed = PlacedGraph(spec, cfg, log=print, progress=not args.no_progress)
        states = placed.frozen_states(*([questions] + ([other] if other else [])))
        pooled = pooled_states(placed.graph, states[0], questions)
        pooled_other = pooled_states(placed.graph, states[1], other) if other else None
        rows = align_graph(pooled, pooled_other, cfg.seed, progress=not args.no_progress)
        title = (f"{spec.name}: {cfg.task} {args.split}, {len(questions)} questions"
                 + (f"; second task {args.cross_task}" if other else ""))
        files = write_alignment(rows, run_dir, title)
    print(files[1].read_text())
    print("written: " + ", ".join(str(f) for f in files))


def cmd_probe_quant(args) -> None:
    import math
    import re

    import torch

    from .nodes import FrozenNode
    from .probe import default_texts, probe_node, read_texts, write_probe
    from .settings import kept_if_started
    from .spec import NodeSpec
    from .train import TrainConfig

    if args.models and (args.preset or args.graph):
        raise UserError("give model paths or ids, or --preset/--graph, not both")
    if args.quant:
        raise UserError("probe-quant measures every format (full, int8, int4-g128, nf4): --quant does not apply")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not math.isfinite(args.threshold) or args.threshold < 0:
        raise UserError(f"--threshold must be a finite percentage >= 0, got {args.threshold}")
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
    with kept_if_started(run_dir, resumable=False):
        for i, (node_spec, (kind, layer)) in enumerate(nodes, 1):
            print(f"probing {i}/{len(nodes)} {node_spec.name} ({node_spec.model}): {len(texts)} texts in full "
                  "precision, int8, int4-g128 and nf4", flush=True)
            node = FrozenNode.load(node_spec, "bf16" if device.type == "cuda" else "fp32", device, max_length,
                                   logits=True)
            if layer is None:
                layer = node.read_layer if kind == "output" else node.inject_layer
            rows += probe_node(node, texts, (kind, layer % node.n_layers), args.batch_size, not args.no_progress)
            del node
            if device.type == "cuda":
                torch.cuda.empty_cache()
        files = write_probe(rows, run_dir, args.threshold)
    print(files[1].read_text())
    print(f"{len(texts)} texts; written: " + ", ".join(str(f) for f in files))


def cmd_plan(args) -> None:
    import torch

    from .memory.budget import parse_budgets, parse_size
    from .memory.firstrun import format_first_run
    from .memory.report import format_plan
    from .memory.search import make_plan

    spec = _spec_from_args(args)
    host = parse_size(args.host_mem) if args.host_mem else None
    plan = make_plan(spec, parse_budgets(args.gpu_mem), args.batch, args.seq, host, device=args.profile)
    print(format_plan(plan, spec))
    for line in format_first_run(spec, plan.device, torch.bfloat16):     # planned for a CUDA device
        print("\n" + line)
