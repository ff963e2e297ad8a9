"""The training step, timed anywhere (CPU or GPU): what placement, streaming and the schedules cost.

    python bench/bench_step.py [--graphs tiny,reduced] [--batch 8] [--seq 64] [--repeats 5] [--threads 1]
                               [--out bench/results]

Graphs: `tiny` (the preset's five tiny architectures) and `reduced` (the paper graph's five real architectures at
1/8 of their width, 32/28/26/32/32 layers, random NF4 weights). Inputs are random tensors of the prefix cache's
shapes, so a step is what training from the cache runs (bench/bench_memory.py builds the same). Rows, each the
median of `--repeats` steps after one warm-up, all measured in this one run:

* plain: every node resident, no checkpointing, one micro-batch: what a user pays without any of this;
* planned: the plan for a roomy budget (everything fits: groups keep their activations) and a tight one;
* resident, checkpointed / streamed, checkpointed: every group checkpointed at the whole batch, resident or
  streamed through two slots: the streaming machinery's own cost (goal on the CPU: within 1.15x);
* micro-batch-major / layer-major: every group streamed at micro-batch 2 (accumulation batch/2), the two
  schedules: group copies per step and time.

Every case is measured once per round, in three rounds (drift on a shared machine then hits every case alike);
figures are medians over rounds, ratios medians of the ratios within a round, against `plain`. The device is named
in every row. CSV and PNG go to `--out`. On the CPU a step is timed by the process's CPU time with torch pinned to
`--threads` (default one): on a machine others share, wall time counts their load, CPU time mostly does not.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_memory  # noqa: E402

from lowmem_graph.memory.placement import Placement  # noqa: E402
from lowmem_graph.memory.report import GiB  # noqa: E402
from lowmem_graph.memory.search import make_plan, with_placement  # noqa: E402
from lowmem_graph.spec import load_preset  # noqa: E402

ROUNDS = 3


def reduced_paper(folder: Path, scale: int = 8):
    """The paper's spec with each node a local folder holding its real configuration at 1/scale width."""
    from lowmem_graph.summary import reduced_config

    spec = load_preset("paper")
    for node in spec.nodes:
        reduced_config(node.model, scale, vocab=512).save_pretrained(folder / node.name)
        node.model = str(folder / node.name)
    spec.name = "reduced"
    spec.latent_dim = 128
    return spec


def _copies(placement) -> int:
    return sum(s.loads for s in placement.streamers)


def clock_for(device):
    """What a step is timed by: process CPU time on the CPU (see the module's docstring), wall time on a GPU."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def measure(label, graph, inputs, device, repeats, plan=None) -> dict:
    """Median step time of `plan` placed (None: the plain step, nothing placed) and its group copies per step."""
    placement = Placement(device, plan)
    placement.start_steps(graph)
    try:
        before = _copies(placement)
        micro = plan.micro_batch if plan is not None else inputs[0].labels.shape[0]
        times = bench_memory.time_steps(graph, inputs, micro, repeats, device, placement if plan else None,
                                        clock_for(device))
        copies = (_copies(placement) - before) / (repeats + 1)
    finally:
        placement.stop_steps()
    groups = plan.groups if plan is not None else []
    return {"config": label, "micro_batch": micro, "schedule": plan.schedule if plan else "-",
            "groups": len(groups), "streamed_groups": sum(not g.resident for g in groups),
            "recomputed_groups": sum(g.checkpointed for g in groups), "step_ms": 1000 * statistics.median(times),
            "step_ms_p20": 1000 * statistics.quantiles(times, n=5)[0] if len(times) > 1 else None,
            "group_copies_per_step": copies}


def quant_for(which: str, device) -> str:
    """NF4 as runs use it, but for the reduced graph on a CPU: bitsandbytes' CPU 4-bit matmul makes its step take
    40 s (measured), which drowns what this benchmark compares; fp32 layers of the same shapes instead."""
    return "fp32" if which == "reduced" and device.type == "cpu" else "nf4"


def run(graphs: list[str], batch: int, seq: int, repeats: int, out_dir: Path, quant_arg: str = "auto",
        threads: int = 1) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    for which in graphs:
        folder = Path(tempfile.mkdtemp(prefix="bench-step-"))
        spec = load_preset("tiny") if which == "tiny" else reduced_paper(folder)
        seq_here = min(seq, spec.max_length)
        quant = quant_for(which, device) if quant_arg == "auto" else quant_arg
        spec.quant = quant
        graph = bench_memory.build_graph(spec, device, quant)
        inputs = bench_memory.random_inputs(graph, batch, seq_here, device)
        roomy = make_plan(spec, 64 * GiB, batch, seq_here, host_budget=64 * GiB)
        every = [dataclasses.replace(g, resident=True, checkpointed=True) for g in roomy.groups]
        streamed = [dataclasses.replace(g, resident=False, checkpointed=True) for g in roomy.groups]
        cases = [("plain", None), ("planned, roomy budget", roomy),
                 ("resident, checkpointed", with_placement(spec, roomy, every, 0, batch)),
                 ("streamed, checkpointed", with_placement(spec, roomy, streamed, 2, batch))]
        if batch >= 4:
            cases += [(f"streamed, micro {2}: {s}", with_placement(spec, roomy, streamed, 2, 2, s))
                      for s in ("micro-batch-major", "layer-major")]
        # rounds, every case once per round, so drift on a shared machine hits all of them alike; each figure is a
        # median over rounds and each ratio a median of the ratios within a round
        rounds = [[measure(label, graph, inputs, device, repeats, plan) for label, plan in cases]
                  for _ in range(ROUNDS)]
        measured = []
        for c, (label, _) in enumerate(cases):
            row = dict(rounds[0][c])
            row["step_ms"] = statistics.median(r[c]["step_ms"] for r in rounds)
            row["vs_plain"] = statistics.median(r[c]["step_ms"] / r[0]["step_ms"] for r in rounds)
            row.update(graph=which, quant=quant, device=name, batch=batch, seq=seq_here, repeats=repeats,
                       rounds=ROUNDS, date=time.strftime("%Y-%m-%d"), torch=torch.__version__)
            measured.append(row)
        streamed, resident = ([label for label, _ in cases].index(k)
                              for k in ("streamed, checkpointed", "resident, checkpointed"))
        measured[streamed]["vs_resident_checkpointed"] = statistics.median(
            r[streamed]["step_ms"] / r[resident]["step_ms"] for r in rounds)
        rows += measured
    write(rows, out_dir, name)
    return rows


def write(rows: list[dict], out_dir: Path, device: str) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / f"step-{slug}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    graphs = list(dict.fromkeys(r["graph"] for r in rows))
    fig, axes = plt.subplots(1, len(graphs), figsize=(7 * len(graphs), 4.5), squeeze=False)
    for ax, g in zip(axes[0], graphs):
        part = [r for r in rows if r["graph"] == g]
        ax.barh([r["config"] for r in part], [r["vs_plain"] for r in part])
        ax.axvline(1.0, color="gray", lw=0.8)
        for i, r in enumerate(part):
            ax.text(r["vs_plain"], i, f" {r['step_ms']:.0f} ms, {r['group_copies_per_step']:.0f} copies",
                    va="center", fontsize=7)
        ax.set(xlabel="step time / plain step (median)", title=f"{g} graph, batch {part[0]['batch']} x "
                                                                 f"{part[0]['seq']} ({device})")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out_dir / f"step-{slug}.png", dpi=110)
    plt.close(fig)
    for row in rows:
        print(f"{row['graph']:<8} {row['config']:<40} {row['step_ms']:>9.1f} ms  x{row['vs_plain']:.2f} plain  "
              f"{row['group_copies_per_step']:>5.1f} copies/step"
              + (f"  x{row['vs_resident_checkpointed']:.2f} resident-checkpointed"
                 if "vs_resident_checkpointed" in row else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", default="tiny,reduced")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch's threads on the CPU")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quant", default="auto", choices=["auto", "nf4", "fp32"],
                        help="frozen weights (auto: NF4, but fp32 for the reduced graph on a CPU)")
    args = parser.parse_args(argv)
    run(args.graphs.split(","), args.batch, args.seq, args.repeats, Path(args.out), args.quant, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
