"""The paper graph's training step under memory budgets, on a GPU, with random weights (no download).

    python bench/bench_memory.py [--budgets 24G,12G,8G,6G,3G,2G] [--batch 8] [--seq 512] [--steps 5] [--out DIR]
    python bench/bench_memory.py --smoke      # the same code on the CPU with the tiny preset (tests run this)

The five real architectures are built from their bundled configurations with random NF4 weights. A step is what
training from the prefix cache runs: the refiners from their injection layer up (checkpointed layer groups,
resident or streamed as the plan says), the projections, the output node, backward and AdamW; the readers'
pooled states and the refiners' injection-layer inputs are random tensors of the cached shapes. For each budget:
measured peak (device memory in use outside torch's allocator, read from the driver, plus torch's peak reserved
bytes) against the plan's prediction, and the median step time against the all-resident step. Also: every group
streamed (the streaming overhead at its worst), the top layers offloaded with accelerate's `cpu_offload` (what
users reach for today), and host-to-device GB/s: the pinned-copy peak of this machine and what the streamer's copies achieved
(timed by CUDA events on the copy stream), and the process's peak host RSS against the plan's host figure.
The frozen pass is measured too: per budget and node, one micro-batch of random tokens through the layers the
node needs, placed as the plan says (resident or streamed), its peak against the plan's and its time.
The paper graph fits 6G whole; 3G streams Mistral's frozen pass and 2G the training step as well.
Without CUDA (and without --smoke) it prints one line and measures nothing.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from lowmem_graph.edge_graph import EdgeGraph, part_key
from lowmem_graph.frozen_pass import frozen_part, highest_part
from lowmem_graph.graph import Batch
from lowmem_graph.memory.budget import parse_size
from lowmem_graph.memory.placement import Placement, norm_and_rotary
from lowmem_graph.memory.report import MiB, device_peaks, others_on_the_gpu, outside_torch_bytes, peak_rss_mib
from lowmem_graph.memory.search import make_plan, with_placement
from lowmem_graph.nodes import FrozenNode
from lowmem_graph.spec import load_preset
from lowmem_graph.loading import meta_model
from lowmem_graph.step import step_gradients



def random_nf4_node(node_spec, max_length: int, device: torch.device, seed: int, quant: str = "nf4") -> FrozenNode:
    """A node of the real architecture with random weights: decoder linears NF4 (double quant), the rest bf16,
    all on the host. Quantised on `device` (fast on a GPU), one linear at a time. `quant="fp32"`: every weight
    dense in fp32 (bitsandbytes' 4-bit matmul on a CPU is far slower than the arithmetic it does)."""
    import bitsandbytes as bnb

    config, model = meta_model(node_spec.model)
    torch.manual_seed(seed)
    base = model.get_decoder()
    for layer in base.layers if quant == "nf4" else []:
        for name, linear in list(layer.named_modules()):
            if not isinstance(linear, torch.nn.Linear):
                continue
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                  device="meta")
            weight = torch.randn(linear.out_features, linear.in_features, dtype=torch.bfloat16, device=device) * 0.02
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to(device).to("cpu")
            if linear.bias is not None:
                q.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=torch.bfloat16),
                                            requires_grad=False)
            parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
            setattr(parent, name.rpartition(".")[2], q)
    for module in model.modules():                      # everything still on meta: real, small, random
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                fresh = torch.empty(p.shape, dtype=torch.bfloat16 if quant == "nf4" else torch.float32)
                fresh.normal_(0, 0.02) if p.dim() > 1 else fresh.fill_(1.0)
                setattr(module, pname, torch.nn.Parameter(fresh, requires_grad=False))
        for bname, b in list(module.named_buffers(recurse=False)):
            if b.is_meta:       # none left in the five architectures once rotary tables are rebuilt; guard anyway
                module.register_buffer(bname, torch.zeros(b.shape, dtype=b.dtype), persistent=False)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None:                              # its tables are computed, not loaded: build it for real
        base.rotary_emb = type(rotary)(config=rotary.config)
    model.eval().requires_grad_(False)
    return FrozenNode(node_spec, model, None, max_length, f"random:{node_spec.model}:{seed}", "cpu")


def build_graph(spec, device, quant: str = "nf4") -> EdgeGraph:
    nodes = {n.name: random_nf4_node(n, spec.max_length, device, i, quant) for i, n in enumerate(spec.nodes)}
    torch.manual_seed(0)
    return EdgeGraph(spec, nodes).to(device)


def random_inputs(graph: EdgeGraph, batch: int, seq: int, device):
    """A batch as the prefix cache serves it, in host memory (pinned for a GPU): every node's input-only parts
    (pooled reads in fp32, streams entering the lowest written layers and per-token reads in the compute dtype).
    Each micro-batch moves to the device when it runs, as in training."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    tokens = {name: (torch.zeros(batch, seq, dtype=torch.long), mask) for name in graph.nodes}
    b = Batch(tokens, torch.randint(0, 4, (batch,)), torch.full((batch,), 4), [str(i) for i in range(batch)])
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    parts = {}
    for name, node in graph.nodes.items():
        for kind, layer in graph.frozen_parts(name):
            shape = (batch, node.width) if kind in ("mean", "last") else (batch, seq, node.width)
            parts[part_key(kind, name, layer)] = torch.randn(
                shape, dtype=torch.float32 if kind in ("mean", "last") else dtype, pin_memory=cuda)
    return b, parts


def time_steps(graph, inputs, micro_batch: int, steps: int, device, placement=None,
               clock=time.perf_counter) -> list[float]:
    """Median-able times of full steps (the trainer's forward and backward over micro-batches, in the plan's
    schedule: `step_gradients`, then AdamW), synchronised; by `clock` (wall time, or bench_step's process CPU time
    on a shared CPU). Leaves no gradients or optimizer state behind, so the next measurement starts from what a
    run holds."""
    optimizer = torch.optim.AdamW(graph.parameters(), lr=1e-4)
    batch, cached = inputs
    n = batch.labels.shape[0]

    def parts():
        for lo in range(0, n, micro_batch):
            part = slice(lo, lo + micro_batch)
            sub = Batch({k: (ids[part], m[part]) for k, (ids, m) in batch.tokens.items()}, batch.labels[part],
                        batch.n_choices[part], batch.ids[part])
            yield sub, ({k: x[part].to(device, non_blocking=True) for k, x in cached.items()},)

    times = []
    for _ in range(steps + 1):                          # the first step warms up and is dropped
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        optimizer.zero_grad(set_to_none=True)
        step_gradients(graph, parts(), n, device, placement)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    optimizer.zero_grad(set_to_none=True)
    return times[1:]


def _fresh_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cuda_context_bytes(device) -> int:
    """Device memory in use outside torch's allocator after one matrix product (the CUDA context, cuBLAS):
    what the plan's `cuda_context` allowance stands for."""
    a = torch.randn(256, 256, device=device)
    (a @ a).sum().item()
    del a
    torch.cuda.empty_cache()
    return outside_torch_bytes(device)


def pinned_copy_gbs(device, nbytes: int = 1 << 30) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def measure(label: str, graph, plan, inputs, device, steps: int, context: int = 0) -> dict:
    _fresh_peak(device)
    placement = Placement(device, plan)
    placement.start_steps(graph)
    streamers = placement.streamers
    try:
        for s in streamers:
            s.copy_times = [] if device.type == "cuda" else None
        before = sum(s.streamed_bytes for s in streamers)
        times = time_steps(graph, inputs, plan.micro_batch, steps, device, placement)
        streamed = (sum(s.streamed_bytes for s in streamers) - before + placement.kept.fetched) / (steps + 1)
        copies = [(n, b, e) for s in streamers for n, b, e in (s.copy_times or [])]
        copy_gbs = None
        if copies:
            torch.cuda.synchronize()
            copy_gbs = sum(n for n, _, _ in copies) / (sum(b.elapsed_time(e) for _, b, e in copies) / 1000) / 1e9
    finally:
        placement.stop_steps()
    row = {"config": label, "budget_gib": plan.budget / 2 ** 30, "micro_batch": plan.micro_batch,
           "schedule": plan.schedule, "predicted_traffic_gb": plan.traffic_per_step / 1e9,
           "resident_mib": plan.resident_bytes / MiB, "streamed_mib": plan.streamed_bytes / MiB,
           "predicted_peak_mib": plan.peak / MiB, "step_ms": 1000 * statistics.median(times),
           "streamed_mib_per_step": streamed / MiB,
           "stream_gbs_lower_bound": streamed / statistics.median(times) / 1e9 if streamed else 0.0,
           "copy_gbs": copy_gbs, "predicted_eval_peak_mib": plan.eval_peak / MiB,
           "predicted_host_mib": plan.host_peak / MiB, **device_peaks(device, context)}
    return row


def measure_frozen(budget: str, graph, plan, device, repeats: int, context: int = 0) -> list[dict]:
    """The frozen pass under the plan, one node at a time: random tokens (a full micro-batch of full-length
    prompts, the plan's worst case) through the layers the node needs, placed as the plan says."""
    rows = []
    for name, placed in plan.frozen.items():
        node = graph.nodes[name]
        vocab = node.model.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, (plan.frozen_micro_batch, plan.seq))
        mask = torch.ones_like(ids)
        kind, layer = graph.frozen_parts(name)[0]
        _fresh_peak(device)
        times = []
        with Placement(device, plan).frozen_pass(node, highest_part(graph, name)) as streamer:
            for _ in range(repeats + 1):                # the first warms up and is dropped
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                frozen_part(node, kind, layer, ids, mask)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            loads = streamer.loads
        row = {"config": f"frozen pass {name}", "budget_gib": plan.budget / 2 ** 30,
               "micro_batch": plan.frozen_micro_batch, "resident_mib": placed.resident_bytes / MiB,
               "streamed_mib": placed.streamed_bytes / MiB, "predicted_peak_mib": placed.peak / MiB,
               "batch_ms": 1000 * statistics.median(times[1:]), "group_loads": loads,
               **device_peaks(device, context)}
        rows.append(row)
    return rows


def accelerate_offload_row(graph, inputs, device, steps: int, context: int = 0) -> dict:
    """The tool users reach for: accelerate's `cpu_offload` on each refiner's top layers (weights copied to the
    device synchronously at each layer's forward, no prefetch). accelerate cannot offload bitsandbytes 4-bit
    weights (it parks them on the meta device, and their quantisation state goes with them), so the offloaded
    layers are bf16 linears of the same shapes, with random weights like everything here; what they move is what
    a user of that tool moves. Runs the whole batch at once, like the all-resident row."""
    import bitsandbytes as bnb
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    row = {"config": "accelerate cpu_offload (bf16 layers)"}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32     # the CPU smoke run has no autocast
    swapped, offloaded = [], []                 # (parent, attribute, the 4-bit linear), layers with hooks
    _fresh_peak(device)
    try:
        for j in graph.refiners:
            node = graph.nodes[j]
            for part in norm_and_rotary(node):
                part.to(device)
            node.device = device
            for layer in list(node.layers)[node.inject_layer:]:
                for name, module in list(layer.named_modules()):
                    if isinstance(module, bnb.nn.Linear4bit):
                        parent, _, attr = name.rpartition(".")
                        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                                dtype=dtype).requires_grad_(False)      # made on the host
                        torch.nn.init.normal_(dense.weight, std=0.02)
                        swapped.append((layer.get_submodule(parent), attr, module))
                        setattr(swapped[-1][0], attr, dense)
                cpu_offload(layer, execution_device=device)
                offloaded.append(layer)
        times = time_steps(graph, inputs, inputs[0].labels.shape[0], steps, device)
        row["step_ms"] = 1000 * statistics.median(times)
        row["offloaded_mib"] = sum(m.in_features * m.out_features * dtype.itemsize for _, _, m in swapped) / MiB
        row.update(device_peaks(device, context))
    except Exception as e:      # report, do not hide: the comparison failed, and why
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        for layer in offloaded:
            remove_hook_from_module(layer, recurse=True)
        for parent, attr, module in swapped:
            setattr(parent, attr, module)
    return row


def run(budgets: list[str], batch: int, seq: int, steps: int, out_dir: Path, smoke: bool) -> list[dict]:
    """Every measurement, the CSV and plot rewritten after each one: a run stopped at its time limit keeps what it
    measured."""
    device = torch.device("cpu" if smoke else "cuda")
    others = others_on_the_gpu() if device.type == "cuda" else None      # before this process's context exists
    context = cuda_context_bytes(device) if device.type == "cuda" else 0
    name = "cpu-smoke" if smoke else torch.cuda.get_device_name(device)
    common = {"device": name, "batch": batch, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    if others is not None:
        common["others_at_start_mib"] = others / MiB
    if device.type == "cuda":
        common["pinned_copy_peak_gbs"] = pinned_copy_gbs(device)
    spec = load_preset("tiny" if smoke else "paper")
    seq = min(seq, spec.max_length)
    common["seq"] = seq
    graph = build_graph(spec, device)
    inputs = random_inputs(graph, batch, seq, device)
    rows, reference, first = [], None, {}

    def add(*new: dict) -> None:
        for row in new:
            row.update(common, host_peak_rss_mib=peak_rss_mib())
            if "step_ms" in row and reference is not None:
                row["step_vs_all_resident"] = row["step_ms"] / reference["step_ms"]
            if "batch_ms" in row:       # the frozen pass against the first (roomiest) budget's, node by node
                row["batch_vs_first_budget"] = row["batch_ms"] / first.setdefault(row["config"], row["batch_ms"])
            rows.append(row)
        write(rows, out_dir, name)

    def attempt(label: str, plan, fn) -> list[dict]:
        """One measurement; where the card is too small for it, a row that says so, and the others still run."""
        try:
            got = fn()
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            return [{"config": label, "budget_gib": plan.budget / 2 ** 30, "predicted_peak_mib": plan.peak / MiB,
                     "error": f"out of memory: {str(e).splitlines()[0][:160]}"}]
        return got if isinstance(got, list) else [got]

    for budget in budgets:
        plan = make_plan(spec, parse_size(budget), batch, seq)
        if not rows:
            everything = with_placement(spec, plan, [dataclasses.replace(g, resident=True) for g in plan.groups],
                                        0, batch)
            (first_row,) = attempt("all resident", everything,
                                   lambda: measure("all resident", graph, everything, inputs, device, steps, context))
            if "step_ms" in first_row:
                reference = first_row
                reference["step_vs_all_resident"] = 1.0
            add(first_row)
        add(*attempt(f"frozen pass at {budget}", plan,
                     lambda: measure_frozen(budget, graph, plan, device, steps, context)))
        add(*attempt(f"plan {budget}", plan, lambda: measure(f"plan {budget}", graph, plan, inputs, device, steps,
                                                             context)))
    # the streaming overhead at its worst: every group streamed, at the all-resident row's micro-batch
    worst = with_placement(spec, plan, [dataclasses.replace(g, resident=False, checkpointed=True)
                                        for g in plan.groups], 2, batch)
    add(*attempt("every group streamed", worst,
                 lambda: measure("every group streamed", graph, worst, inputs, device, steps, context)))
    add(accelerate_offload_row(graph, inputs, device, steps, context))
    for row in rows:
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})
    return rows


def write(rows: list[dict], out_dir: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower())
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / f"memory-{slug}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    steps = [r for r in rows if "step_ms" in r]
    frozen = [r for r in rows if "batch_ms" in r]
    fig, axes = plt.subplots(2, 2, figsize=(14, 8), squeeze=False)
    for (ax_mem, ax_time), part, what, ms in ((axes[0], steps, "training step", "step_ms"),
                                              (axes[1], frozen, "frozen pass micro-batch", "batch_ms")):
        labels = [r["config"] if ms == "step_ms" else f"{r['budget_gib']:g}G {r['config'].split()[-1]}"
                  for r in part]
        x = list(range(len(part)))
        ax_mem.bar([i - 0.2 for i in x], [r.get("predicted_peak_mib", 0) for r in part], 0.4,
                   label="plan's prediction")
        ax_mem.bar([i + 0.2 for i in x], [r.get("measured_peak_mib") or 0 for r in part], 0.4,
                   label="measured: CUDA context + peak reserved")
        ax_mem.set(ylabel="MiB", title=f"peak memory, {what} ({device_name})")
        ax_time.bar(x, [r[ms] for r in part])
        ax_time.set(ylabel="ms (median)", title=f"{what} time")
        for ax in (ax_mem, ax_time):
            ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=7)
        ax_mem.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"memory-{slug}.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="24G,12G,8G,6G,3G,2G")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU: checks the code, measures nothing")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: memory benchmarks need a GPU; nothing measured")
        return 3                # a run that measured nothing does not pass for one that did
    run(args.budgets.split(","), args.batch, args.seq, args.steps, Path(args.out), args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
