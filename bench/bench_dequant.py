"""What dequantising NF4 costs a checkpointed layer, and what one shared dequantised weight would save.

    python bench/bench_dequant.py [--tokens 512,2048,4096] [--scale 1] [--repeats 10] [--out bench/results]

A frozen NF4 linear in a checkpointed group runs its 4-bit product three times per micro-batch: the forward, the
recompute, and the input gradient. bitsandbytes 0.50 runs both forwards through its `gemm_4bit` op, which on CUDA
picks per GPU architecture and shape between a fused 4-bit GEMM (up to 1536 rows) and dequantise + cuBLAS; the
input gradient always dequantises. Our nodes' Linear4bit reaches that op unchanged, so the fused path is taken
wherever bitsandbytes measured it to win. `SharedDequant`, a small autograd Function, dequantises once in the
recompute and keeps that weight for the backward: two dequantisations and no fused forward, at the price of
holding every dequantised weight of a checkpointed group from its recompute to its backward (16-bit: four times
the group's NF4 bytes; per layer, the `held_mib` column). Outside checkpointing it would hold every layer's
weight from forward to backward, so it could only ever apply to recomputed groups.

On the refiners' real decoder layers (Phi-3-mini, Mistral-7B; `--scale` divides their width, random NF4 weights
with double quantisation as the nodes load), per micro-batch of `tokens` tokens and per linear:

* today: bitsandbytes' Linear4bit forward without grad (checkpoint's first pass), then forward with grad (the
  recompute) and backward to the input;
* shared: the same first pass, then SharedDequant forward and backward (the two give the same input gradient,
  checked at every shape);
* dequantise, matmul: each alone; `dequantise_share` is three dequantisations against today's time (an upper
  bound where bitsandbytes' forward is fused).

Each row is the median of `--repeats` rounds after a warm-up, both schedules interleaved in every round (on a GPU
each round times 5 calls queued back to back); one row per layer sums its linears. Compute in bf16 on CUDA, fp32 on the CPU (as the nodes compute). Writes
dequant-<device>.csv under --out and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from lowmem_graph.files import atomic_file

REFINERS = {"phi3": "microsoft/Phi-3-mini-4k-instruct", "mistral": "mistralai/Mistral-7B-v0.1"}
PAYS = 0.05            # below 5% of a layer's frozen-linear time, holding a group's 16-bit weights is not worth it


class SharedDequant(torch.autograd.Function):
    """y = x W^T for a frozen NF4 linear, dequantising W once for both the product and the input gradient."""

    @staticmethod
    def forward(ctx, x, linear):
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state).to(x.dtype)
        ctx.save_for_backward(weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None


def layer_linears(ref: str, scale: int) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of every linear in one decoder layer of the bundled configuration."""
    from transformers import AutoModelForCausalLM

    from lowmem_graph.summary import reduced_config

    config = reduced_config(ref, scale, layers=1)
    with torch.device("meta"):
        layer = AutoModelForCausalLM.from_config(config).get_decoder().layers[0]
    return [(name, m.out_features, m.in_features) for name, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear)]


def nf4_linear(out_features: int, in_features: int, dtype, device, seed: int = 0):
    """A frozen bitsandbytes Linear4bit (NF4, double quantisation) with random weights, set up as nodes are."""
    import bitsandbytes as bnb

    from lowmem_graph.nodes import freeze_linears

    torch.manual_seed(seed)
    linear = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4",
                               compress_statistics=True, device="meta")
    weight = torch.randn(out_features, in_features, dtype=dtype, device=device) * in_features ** -0.5
    linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                      compress_statistics=True).to(device)
    return freeze_linears(linear)


def _clock(device, calls: int):
    """A function that runs fn `calls` times back to back and returns ms per call: CUDA events around the queued
    calls on a GPU (no call timed from an idle GPU, one synchronisation), wall clock on the CPU."""
    def timed(fn):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return 1000 * (time.perf_counter() - begin) / calls
    return timed


def measure_linear(linear, tokens: int, dtype, device, repeats: int) -> dict:
    """Median ms of each schedule and of each cause, for one linear at one micro-batch."""
    import bitsandbytes.functional as bnbf

    out_features, in_features = linear.out_features, linear.in_features
    x = torch.randn(tokens, in_features, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(tokens, out_features, dtype=dtype, device=device)
    weight = bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state).to(dtype)

    def today():
        with torch.no_grad():
            linear(x)
        linear(x).backward(dy)

    def shared():
        with torch.no_grad():
            linear(x)
        SharedDequant.apply(x, linear).backward(dy)

    cases = {"today": today, "shared": shared,
             "dequantise": lambda: bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state),
             "matmul": lambda: x.detach() @ weight.t()}
    # The two schedules compute the same: bitsandbytes' forward (fused or not) and SharedDequant's, within the
    # dtype's rounding; the input gradients from the same dequantised weight (bit for bit on the CPU).
    tol = 1e-2 if dtype != torch.float32 else 1e-5
    with torch.no_grad():
        want, got = linear(x), SharedDequant.apply(x, linear)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    x.grad = None
    today()
    want, x.grad = x.grad, None
    shared()
    torch.testing.assert_close(x.grad, want)
    timed = _clock(device, calls=5 if device.type == "cuda" else 1)
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            x.grad = None
            times[name].append(timed(fn))
    return {f"{name}_ms": statistics.median(t) for name, t in times.items()}


def run(tokens: list[int], scale: int, repeats: int, device, out_dir: Path | None = None) -> list[dict]:
    """Rows per linear and token count, then one per layer; the CSV rewritten after each model (a run cut short
    keeps what it measured)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    meta = {"date": datetime.now().isoformat(timespec="seconds"), "device": name, "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."), "scale": scale}
    rows = []
    for model, ref in REFINERS.items():
        print(f"measuring {model} (1/{scale} width) at {', '.join(map(str, tokens))} tokens ...", flush=True)
        per_tokens = {t: [] for t in tokens}
        for lname, out_features, in_features in layer_linears(ref, scale):
            linear = nf4_linear(out_features, in_features, dtype, device)     # quantised once, for every size
            held = out_features * in_features * dtype.itemsize / 2 ** 20
            for t in tokens:
                times = measure_linear(linear, t, dtype, device, repeats)
                per_tokens[t].append({**meta, "model": model, "linear": lname, "out": out_features,
                                      "in": in_features, "tokens": t, **times, "held_mib": round(held, 2)})
            del linear
        for t, per_linear in per_tokens.items():
            layer = {k: sum(r[k] for r in per_linear) for k in per_linear[0] if k.endswith("_ms") or k == "held_mib"}
            rows += per_linear + [{**meta, "model": model, "linear": "layer", "tokens": t, **layer}]
        _derive(rows)
        if out_dir is not None:
            write_csv(rows, out_dir)
    return rows


def _derive(rows: list[dict]) -> None:
    for row in rows:
        for key in [k for k in row if k.endswith("_ms")]:
            row[key] = round(row[key], 4)
        row["saving"] = round(1 - row["shared_ms"] / row["today_ms"], 4)
        row["dequantise_share"] = round(3 * row["dequantise_ms"] / row["today_ms"], 4)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<8} {'tokens':>6} {'today ms':>9} {'shared ms':>9} {'saving':>7} {'dequant share':>13} "
             f"{'held MiB/layer':>14}"]
    for r in rows:
        if r["linear"] == "layer":
            lines.append(f"{r['model']:<8} {r['tokens']:>6} {r['today_ms']:>9.3f} {r['shared_ms']:>9.3f} "
                         f"{r['saving']:>7.1%} {r['dequantise_share']:>13.1%} {r['held_mib']:>14.1f}")
    return "\n".join(lines)


def write_csv(rows: list[dict], out_dir: Path) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in rows[0]["device"].lower()).strip("-")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"dequant-{slug}.csv"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="512,2048,4096", help="tokens per micro-batch (comma-separated)")
    parser.add_argument("--scale", type=int, default=1, help="divide the layers' width by this (CPU: 4 or 8)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run([int(t) for t in args.tokens.split(",")], args.scale, args.repeats, device, Path(args.out))
    print(format_table(rows))
    print(f"sharing pays where it saves >= {PAYS:.0%} of a layer's time and the plan has room for the held weights")
    print(f"results: {write_csv(rows, Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
