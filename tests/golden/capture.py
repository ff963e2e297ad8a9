"""Capture the golden figures that tests/test_golden.py requires later code to reproduce.

Captured from the code as it was before the runtime refactor (FrozenGraph removed, everything on EdgeGraph):

* tiny.json: the tiny preset over 2 epochs (seed 0, the preset's other settings), through the public CLI
  (`lowmem-graph train --preset tiny --epochs 2 --device cpu --run-dir ... --cache-dir ...`), each variant with a
  prefix cache of its own (a fresh frozen pass). Read from each run's metrics.jsonl: every step's loss, acc and grad
  norm, every epoch's eval accuracy and loss (and train loss, acc, eval_n). Variants:
    plain                                no --gpu-mem: everything on the device (the CPU)
    gpu-mem-0.6G/micro-batch-major       --gpu-mem 0.6G, the schedule forced to ...
    gpu-mem-0.6G/layer-major             (see `forced_schedule`; the planner picks one of them itself, recorded
    gpu-mem-0.6G/layer-major-host         under "planner" and in each variant's "planner_schedule")
  and, for information only (its figures will move with a seed-rule change), lm/<variant>: the residual-coupling
  example (`lowmem-graph train --graph examples/residual_coupling.yaml --compare --device cpu`), every step's loss
  and every epoch's held-out perplexities per lm variant (alone, router, coupled). Also the environment the
  figures were computed in (`environment`).
* plan-paper-<budget>.txt for 24G, 6G, 3G, 2G: the stdout of
  `lowmem-graph plan --preset paper --gpu-mem <budget> --host-mem 64G` (meta-device models, no download). The host
  memory is given so that the text does not depend on what this machine has available now (the plan's host line
  prints it); nothing else in the plan depends on it.

Floats are written by json (repr: exact round trip). The seconds each run took are printed, not written: a
capture that gives the same figures leaves every file as it was. Run from the repository root:

    python tests/golden/capture.py [--out tests/golden] [--only plain ...] [--no-lm] [--no-plans]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

BUDGET = "0.6G"
SCHEDULES = ("micro-batch-major", "layer-major", "layer-major-host")
TINY_VARIANTS = ("plain",) + tuple(f"gpu-mem-{BUDGET}/{s}" for s in SCHEDULES)
PLAN_BUDGETS = ("24G", "6G", "3G", "2G")
PLAN_HOST_MEM = "64G"
EPOCHS = 2
STEP_KEYS = ("loss", "acc", "grad_norm")
EPOCH_KEYS = ("eval_acc", "eval_loss", "eval_n", "train_loss", "train_acc")


def setup_env() -> None:
    """The environment the test suite runs in (tests/conftest.py): offline, Triton's interpreter without a GPU, a
    fresh model cache unless one is given."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("LOWMEM_GRAPH_CACHE", tempfile.mkdtemp(prefix="lowmem-graph-golden-cache-"))


@contextlib.contextmanager
def forced_schedule(schedule: str | None):
    """While open, every plan a run makes (`memory.search.make_plan`, which the run imports when it plans) has
    `schedule`: the planner's own plan, its groups, residency, slots and micro-batch kept, the schedule replaced and
    the predictions recomputed (`with_placement`). The layer-major schedules run every group from a kept input, so
    there every group is made checkpointed (recomputed in backward). Yields the list of plans made: (the planner's,
    the one used)."""
    from lowmem_graph.memory import search as planning

    original = planning.make_plan
    made = []

    def make_plan(spec, *args, **kwargs):
        plan = original(spec, *args, **kwargs)
        used = plan
        if schedule is not None and plan.schedule != schedule:
            groups = plan.groups
            if schedule != "micro-batch-major":
                groups = [dataclasses.replace(g, checkpointed=True) for g in groups]
            used = planning.with_placement(spec, plan, groups, plan.prefetch_depth, plan.micro_batch, schedule)
        made.append((plan, used))
        return used

    planning.make_plan = make_plan
    try:
        yield made
    finally:
        planning.make_plan = original


def describe_plan(plan) -> dict:
    return {"schedule": plan.schedule, "micro_batch": plan.micro_batch, "accumulation": plan.accumulation,
            "prefetch_depth": plan.prefetch_depth, "seq": plan.seq,
            "groups": [[g.node, g.first, g.last, "resident" if g.resident else "streamed",
                        "checkpointed" if g.checkpointed else "keeps activations"] for g in plan.groups],
            "predicted_peak": plan.peak, "predicted_eval_peak": plan.eval_peak, "budget": plan.budget,
            "fits": max(plan.peak, plan.eval_peak) <= plan.budget}


def environment() -> dict:
    """What the figures' last bits depend on besides the code: they are exact on the environment they were captured
    in (an explicit torch.set_num_threads call, even to the same count, changes some of them in the 7th digit)."""
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    versions = {}
    for name in ("transformers", "bitsandbytes"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"torch": torch.__version__, **versions, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpu": cpu}


def read_tiny_metrics(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"step": r["step"], "epoch": r["epoch"], **{k: r[k] for k in STEP_KEYS if k in r}}
             for r in records if r.get("kind") == "step"]
    epochs = [{"epoch": r["epoch"], "step": r["step"], **{k: r[k] for k in EPOCH_KEYS if k in r}}
              for r in records if r.get("kind") == "epoch"]
    return {"steps": steps, "epochs": epochs}


def _cli(argv: list[str]) -> str:
    """`lowmem-graph ARGV` in this process; its stdout (a non-zero exit raises)."""
    from lowmem_graph.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code not in (0, None):
        raise RuntimeError(f"lowmem-graph {' '.join(argv)} exited with {code}:\n{out.getvalue()}")
    return out.getvalue()


def run_tiny(variant: str, work: str | Path) -> dict:
    """One tiny variant trained in `work` (a new folder: its run folder and its own prefix cache); its figures,
    the seconds it took and, under a plan, the plans made."""
    work = Path(work)
    argv = ["train", "--preset", "tiny", "--epochs", str(EPOCHS), "--run-dir", str(work / "run"),
            "--cache-dir", str(work / "prefix"), "--device", "cpu", "--no-progress"]
    schedule = None
    if variant != "plain":
        prefix, _, schedule = variant.partition("/")
        assert prefix == f"gpu-mem-{BUDGET}" and schedule in SCHEDULES, variant
        argv += ["--gpu-mem", BUDGET]
    started = time.perf_counter()
    with forced_schedule(schedule) as made:
        _cli(argv)
    seconds = time.perf_counter() - started
    figures = read_tiny_metrics(work / "run")
    if schedule is not None:
        if not made:
            raise RuntimeError(f"{variant}: the run made no plan")
        planner, used = made[0]
        figures["plan"] = describe_plan(used)
        figures["planner_schedule"] = planner.schedule
        figures["forced"] = used is not planner
    return {"figures": figures, "seconds": seconds}


def planner_pick() -> dict:
    """The plan the planner makes itself for the tiny runs at the budget (batch 8, seq = the spec's max_length)."""
    from lowmem_graph.memory.budget import parse_budgets
    from lowmem_graph.memory.search import make_plan
    from lowmem_graph.spec import load_preset

    spec = load_preset("tiny")
    return describe_plan(make_plan(spec, parse_budgets(BUDGET), spec.train.get("batch_size", 8), spec.max_length,
                                   main="cpu"))


def read_lm_metrics(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {}
    for r in records:
        v = out.setdefault(r["variant"], {"steps": [], "epochs": []})
        if "loss" in r:       # a step (an epoch's record has train_loss; since one trainer, a step too)
            v["steps"].append({"step": r["step"], "loss": r["loss"]})
        else:
            v["epochs"].append({k: r[k] for k in ("epoch", "perplexity", "train_loss") if k in r})
    return out


def run_lm(work: str | Path) -> dict:
    work = Path(work)
    started = time.perf_counter()
    _cli(["train", "--graph", str(ROOT / "examples" / "residual_coupling.yaml"), "--compare",
          "--run-dir", str(work / "run"), "--cache-dir", str(work / "prefix"), "--device", "cpu", "--no-progress"])
    return {"figures": read_lm_metrics(work / "run"), "seconds": time.perf_counter() - started}


def plan_text(budget: str) -> str:
    """The plan, without its first-run line (what this machine has yet to download and quantise: it depends on the
    machine's hub and node caches, not on the planner)."""
    text = _cli(["plan", "--preset", "paper", "--gpu-mem", budget, "--host-mem", PLAN_HOST_MEM])
    return re.sub(r"\n\nfirst run \(once, then cached\): [^\n]*\n$", "\n", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE), help="where tiny.json and plan-paper-*.txt go (default: "
                                                          "tests/golden)")
    parser.add_argument("--only", nargs="+", choices=TINY_VARIANTS, help="tiny variants to run (default: all)")
    parser.add_argument("--no-lm", action="store_true", help="skip the residual-coupling example")
    parser.add_argument("--no-plans", action="store_true", help="skip the plan texts")
    parser.add_argument("--work", help="keep the run folders here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    setup_env()
    sys.path.insert(0, str(ROOT))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if not args.no_plans:
        for budget in PLAN_BUDGETS:
            text = plan_text(budget)
            (out / f"plan-paper-{budget}.txt").write_text(text)
            print(f"plan-paper-{budget}.txt: {len(text.splitlines())} lines", flush=True)

    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        golden = {"about": "tests/golden/capture.py: the tiny preset, 2 epochs, seed 0, each variant with its own "
                           "prefix cache; floats exact (json repr). Compared by tests/test_golden.py.",
                  "environment": environment(), "planner": {BUDGET: planner_pick()}, "variants": {}}
        for variant in args.only or TINY_VARIANTS:
            result = run_tiny(variant, work / variant.replace("/", "_"))
            golden["variants"][variant] = result["figures"]
            print(f"{variant}: {len(result['figures']['steps'])} steps, eval acc "
                  f"{[e['eval_acc'] for e in result['figures']['epochs']]}, {result['seconds']:.1f} s", flush=True)
        if not args.no_lm:
            result = run_lm(work / "lm")
            for variant, figures in result["figures"].items():
                golden["variants"][f"lm/{variant}"] = figures
            print(f"lm: {', '.join(result['figures'])}, {result['seconds']:.1f} s", flush=True)
        (out / "tiny.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(f"written: {out / 'tiny.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
