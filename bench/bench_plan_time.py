"""The planner's cost model against measurement, on this machine's CPU: predicted vs measured step and epoch times.

    python bench/bench_plan_time.py [--graphs tiny,reduced] [--batch 8] [--seq 64] [--repeats 3] [--out bench/results]

One torch thread, process CPU time (`time.process_time`), so other programs on a shared machine do not count and
no OpenMP thread spins. It first calibrates this CPU (bench/calibrate.py, in process, the same thread count), then
for each graph (`tiny`: the preset; `reduced`: the paper graph at 1/8 width, bench_step.py's, fp32 frozen layers on
a CPU) plans at several budgets, from roomy down to the smallest that fits, the fastest plan of every schedule
that fits there (`make_plan(..., schedules=...)`); the planner's own choice is the fastest of them. Each case runs
1 + `--repeats` training steps from a fresh placement (random inputs of the prefix cache's shapes, AdamW): the
step figure is the median of all but the first, the epoch figure the sum of all of them (an epoch of
(1 + repeats) x batch examples, its first step from empty slots; no evaluation). Cases are measured once per
round in interleaved rounds; figures are medians over rounds. Written: `plan-time-<device>.csv` and `.md` in
`--out`, with the predicted and measured group copies per step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_memory  # noqa: E402
import bench_step  # noqa: E402
import calibrate  # noqa: E402

from lowmem_graph.errors import UserError  # noqa: E402
from lowmem_graph.memory.estimate import group_loads  # noqa: E402
from lowmem_graph.memory.placement import Placement  # noqa: E402
from lowmem_graph.memory.report import GiB, MiB  # noqa: E402
from lowmem_graph.memory.search import make_plan  # noqa: E402
from lowmem_graph.spec import load_preset  # noqa: E402
from lowmem_graph.step import step_gradients  # noqa: E402

ROUNDS = 3
SCHEDULES = ("micro-batch-major", "layer-major", "layer-major-host")
FRACTIONS = (1.0, 0.5, 0.15, 0.0)   # budgets between the smallest that fits (0) and the roomy plan's peak (1)


def run_steps(graph, inputs, plan, steps: int) -> tuple[list[float], list[int]]:
    """Process CPU seconds of each of `steps` steps under `plan` from a fresh placement, and the group copies each
    made."""
    placement = Placement("cpu", plan)
    placement.start_steps(graph)
    optimizer = torch.optim.AdamW(graph.parameters(), lr=1e-4)
    batch, cached = inputs
    n = batch.labels.shape[0]
    micro = plan.micro_batch

    def parts():
        from lowmem_graph.graph import Batch

        for lo in range(0, n, micro):
            part = slice(lo, lo + micro)
            sub = Batch({k: (ids[part], m[part]) for k, (ids, m) in batch.tokens.items()}, batch.labels[part],
                        batch.n_choices[part], batch.ids[part])
            yield sub, ({k: x[part] for k, x in cached.items()},)

    times, copies = [], []
    try:
        for _ in range(steps):
            before = sum(s.loads for s in placement.streamers)
            start = time.process_time()
            optimizer.zero_grad(set_to_none=True)
            step_gradients(graph, parts(), n, "cpu", placement)
            optimizer.step()
            times.append(time.process_time() - start)
            copies.append(sum(s.loads for s in placement.streamers) - before)
    finally:
        optimizer.zero_grad(set_to_none=True)
        placement.stop_steps()
    return times, copies


def cases_for(spec, batch: int, seq: int, profile) -> list[tuple[str, str, object, bool]]:
    """(budget, schedule, plan, chosen by the planner) for every budget and schedule with a plan."""
    roomy = make_plan(spec, 64 * GiB, batch, seq, host_budget=64 * GiB, main="cpu", device=profile)
    low, high = roomy.minimum, max(roomy.peak, roomy.eval_peak)
    cases = []
    for budget in sorted({int(low + f * (high - low)) for f in FRACTIONS}, reverse=True):
        chosen = make_plan(spec, budget, batch, seq, host_budget=64 * GiB, main="cpu", device=profile)
        for schedule in SCHEDULES:
            try:
                plan = make_plan(spec, budget, batch, seq, host_budget=64 * GiB, main="cpu", device=profile,
                                 schedules=(schedule,))
            except UserError:
                continue
            cases.append((f"{budget / MiB:,.0f} MiB", schedule, plan, schedule == chosen.schedule))
    return cases


def describe(plan) -> str:
    streamed = sum(not g.resident for g in plan.groups)
    recomputed = sum(g.last - g.first for g in plan.groups if g.checkpointed)
    return (f"micro {plan.micro_batch}, {streamed}/{len(plan.groups)} streamed, depth {plan.prefetch_depth}, "
            f"{recomputed} layers recomputed")


def run(graphs: list[str], batch: int, seq: int, repeats: int, out_dir: Path) -> list[dict]:
    torch.set_num_threads(1)
    profile = calibrate.measure("cpu")
    print(calibrate.describe(profile), flush=True)
    rows = []
    for which in graphs:
        folder = Path(tempfile.mkdtemp(prefix="bench-plan-time-"))
        spec = load_preset("tiny") if which == "tiny" else bench_step.reduced_paper(folder)
        spec.quant = bench_step.quant_for(which, torch.device("cpu"))
        seq_here = min(seq, spec.max_length)
        graph = bench_memory.build_graph(spec, torch.device("cpu"), spec.quant)
        inputs = bench_memory.random_inputs(graph, batch, seq_here, "cpu")
        cases = cases_for(spec, batch, seq_here, profile)
        measured = [[run_steps(graph, inputs, plan, 1 + repeats) for *_, plan, _ in cases] for _ in range(ROUNDS)]
        for c, (budget, schedule, plan, chosen) in enumerate(cases):
            step = statistics.median(statistics.median(r[c][0][1:]) for r in measured)
            epoch = statistics.median(sum(r[c][0]) for r in measured)
            forward, backward = group_loads(plan.groups, plan.prefetch_depth)
            per_step = (len(forward) + len(backward)) * (plan.accumulation if schedule == SCHEDULES[0] else 1)
            predicted_epoch = plan.timing.epoch((1 + repeats) * batch, batch)
            rows.append({"graph": which, "quant": spec.quant, "budget": budget, "schedule": schedule,
                         "placement": describe(plan), "chosen": chosen,
                         "predicted_step_ms": 1000 * plan.timing.step, "measured_step_ms": 1000 * step,
                         "step_error": plan.timing.step / step - 1,
                         "predicted_epoch_ms": 1000 * predicted_epoch, "measured_epoch_ms": 1000 * epoch,
                         "epoch_error": predicted_epoch / epoch - 1,
                         "predicted_copies_per_step": per_step,
                         "measured_copies_per_step": statistics.median(measured[0][c][1][1:]),
                         "bottleneck": plan.timing.bottleneck, "batch": batch, "seq": seq_here,
                         "repeats": repeats, "rounds": ROUNDS})
            print(f"{which:<8} {budget:>12} {schedule:<18} {describe(plan):<52} predicted "
                  f"{rows[-1]['predicted_step_ms']:8.1f} ms, measured {rows[-1]['measured_step_ms']:8.1f} ms "
                  f"({rows[-1]['step_error']:+.0%}){'  <- chosen' if chosen else ''}", flush=True)
    write(rows, out_dir, profile)
    return rows


def write(rows: list[dict], out_dir: Path, profile) -> None:
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "plan-time-cpu.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Predicted against measured step and epoch times, {time.strftime('%Y-%m-%d')}", "",
             f"`python bench/bench_plan_time.py` (one thread, process CPU time, {ROUNDS} interleaved rounds). Profile "
             f"{profile.source}: {calibrate.describe(profile)}.", "",
             "| graph | budget | schedule | placement | predicted step ms | measured step ms | error | predicted epoch "
             "ms | measured epoch ms | error | copies/step predicted, measured | chosen |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['graph']} | {r['budget']} | {r['schedule']} | {r['placement']} | "
                     f"{r['predicted_step_ms']:.1f} | {r['measured_step_ms']:.1f} | {r['step_error']:+.0%} | "
                     f"{r['predicted_epoch_ms']:.0f} | {r['measured_epoch_ms']:.0f} | {r['epoch_error']:+.0%} | "
                     f"{r['predicted_copies_per_step']}, {r['measured_copies_per_step']:g} | "
                     f"{'yes' if r['chosen'] else ''} |")
    within = sum(abs(r["step_error"]) <= 0.3 for r in rows)
    budgets = {(r["graph"], r["budget"]) for r in rows}
    fastest = sum(min((r for r in rows if (r["graph"], r["budget"]) == b), key=lambda r: r["measured_step_ms"])
                  ["chosen"] for b in budgets)
    lines += ["", f"Steps predicted within 30%: {within} of {len(rows)}. The planner's choice was the measured "
                  f"fastest at {fastest} of {len(budgets)} budgets."]
    (out_dir / "plan-time-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", default="tiny,reduced")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    run(args.graphs.split(","), args.batch, args.seq, args.repeats, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
