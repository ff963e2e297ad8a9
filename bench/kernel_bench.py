"""Benchmark of the injection op: eager PyTorch, torch.compile, our Triton kernel, and cuBLAS GEMMs around our
blend kernels ("cublas": what the Triton GEMMs replace), on one GPU.

Shapes are the paper's (batch 8 x 512 tokens, readers 2048/1536/2304 -> latent 1024 -> refiners 3072 and
4096) plus a sweep of sequence lengths at D=4096, pooled and per-token, bf16 activations with fp32 weights
(the trainable parameters are fp32). Each row is one implementation and direction (fwd, bwd, full =
fwd+bwd) timed with `triton.testing.do_bench` (median, 20th/80th percentiles; L2 cleared before each run),
with its peak memory above what was allocated before the call and its achieved bandwidth.

Measuring needs CUDA; writing the CSV, plotting and the table work on rows alone, so they are tested on CPU.
`smoke=True` runs the same measuring code on the CPU at one tiny shape per mode (wall-clock medians, memory from
`LiveBytes`, Triton through its interpreter, torch.compile with dynamo's eager backend, since inductor's CPU codegen
takes half a minute per graph): it checks the code and measures nothing worth quoting.
"""
from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lowmem_graph.files import atomic_file

NO_GPU = "no CUDA device: kernel benchmarks need a GPU; nothing measured"
IMPLS = ("eager", "compile", "triton", "cublas")
DIRECTIONS = ("fwd", "bwd", "full")
PAPER_SEQ_LEN = 512
SWEEP_SEQ_LENS = (128, 256, 512, 1024, 2048)
SWEEP_D = 4096
BLEND = 0.3
GOAL_VS_EAGER = 1.5
COLUMNS = ["date", "device", "torch", "triton", "peak_gbs", "peak_gbs_source", "fp32_matmul",
           "mode", "batch", "seq_len", "d_model", "latent", "readers", "act_dtype", "param_dtype",
           "impl", "direction", "ms_median", "ms_p20", "ms_p80", "peak_mem_mib", "min_bytes", "gbs",
           "bw_share", "speedup_vs_eager", "speedup_vs_compile", "triton_vs_cublas", "meets_goal"]
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Peak DRAM bandwidth (GB/s) from the vendors' spec sheets, matched against torch.cuda.get_device_name().
# Anchored patterns keep A100 from matching A10, L40 from L4 and 3090 Ti from 3090.
_SPEC_GBS = [
    (r"H100.*(SXM|HBM3)", 3350),
    (r"H100 PCIe", 2000),
    (r"H200", 4800),
    (r"A100.*80GB PCIe", 1935),
    (r"A100.*80GB", 2039),
    (r"A100.*40GB", 1555),
    (r"RTX 4090\b", 1008),
    (r"RTX 3090$", 936),
    (r"\bL4$", 300),
    (r"\bA10G?$", 600),
    (r"\bT4$", 320),
]


@dataclass(frozen=True)
class Case:
    """One shape: h is (batch, seq_len, d_model); readers are (batch, d) pooled or (batch, seq_len, d) per-token."""

    mode: str  # "pooled" | "per_token"
    batch: int
    seq_len: int
    d_model: int
    latent: int = 1024
    widths: tuple[int, ...] = (2048, 1536, 2304)
    act_dtype: str = "bfloat16"
    param_dtype: str = "float32"


def bench_cases(quick: bool = False, smoke: bool = False) -> list[Case]:
    """The paper's shape for each refiner, then (unless quick) the sequence-length sweep at D=4096; in smoke mode
    one tiny shape per mode."""
    if smoke:
        return [Case(mode, 2, 8, 32, 16, (24, 40), "float32") for mode in ("pooled", "per_token")]
    # Largest refiner first, both modes: a run cut short by its time limit keeps the shapes that matter most.
    cases = [Case(mode, 8, PAPER_SEQ_LEN, d) for d in (4096, 3072) for mode in ("pooled", "per_token")]
    if not quick:
        cases += [Case(mode, 8, t, SWEEP_D) for mode in ("pooled", "per_token")
                  for t in SWEEP_SEQ_LENS if t != PAPER_SEQ_LEN]
    return cases


def min_bytes(case: Case, direction: str) -> int:
    """Bytes any implementation must move through DRAM, so GB/s = min_bytes / time never flatters one.

    N = batch*seq_len rows of h; R = batch (pooled) or N (per-token) reader rows; S = sum of reader widths;
    a = bytes per activation (h, x_k, dy, out, dh); p = bytes per parameter (W_k, carry and their grads).
      fwd  = N*D*a (read h) + R*S*a (read x_k) + L*S*p (read W_k) + D*L*p (read carry) + N*D*a (write out)
      bwd  = 2*N*D*a (read dy, h) + R*S*a (read x_k, for dW_k) + min(R*L*4, L*S*p) (the fp32 latent z:
             read it saved, or recompute it from W_k) + D*L*p (read carry) + N*D*a (write dh)
             + L*S*p + D*L*p (write dW_k, dcarry)
      full = fwd + bwd: the two passes are separate, so backward re-reads what forward read.
    """
    n = case.batch * case.seq_len
    r = case.batch if case.mode == "pooled" else n
    s, d, lat = sum(case.widths), case.d_model, case.latent
    a, p = _BYTES[case.act_dtype], _BYTES[case.param_dtype]
    fwd = 2 * n * d * a + r * s * a + lat * s * p + d * lat * p
    bwd = 3 * n * d * a + r * s * a + min(r * lat * 4, lat * s * p) + 2 * d * lat * p + lat * s * p
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[direction]


def spec_bandwidth(device_name: str) -> float | None:
    """Peak DRAM GB/s from the spec-sheet table, or None for a GPU it does not know."""
    for pattern, gbs in _SPEC_GBS:
        if re.search(pattern, device_name):
            return float(gbs)
    return None


def device_slug(device_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def add_comparisons(rows: list[dict]) -> list[dict]:
    """Fill speedups vs eager and vs compile (same shape and direction) and, for Triton rows, how much faster than
    cuBLAS GEMMs around the same blend it is, and the issue's goal: >= 1.5x eager, no slower than torch.compile
    (median), and a lower peak memory than both."""
    by_key = {(r["mode"], r["batch"], r["seq_len"], r["d_model"], r["direction"], r["impl"]): r for r in rows}
    for row in rows:
        key = (row["mode"], row["batch"], row["seq_len"], row["d_model"], row["direction"])
        eager, compiled = by_key[(*key, "eager")], by_key[(*key, "compile")]
        row["speedup_vs_eager"] = round(eager["ms_median"] / row["ms_median"], 3)
        row["speedup_vs_compile"] = round(compiled["ms_median"] / row["ms_median"], 3)
        cublas = by_key.get((*key, "cublas"))
        row["triton_vs_cublas"] = (round(cublas["ms_median"] / row["ms_median"], 3)
                                   if row["impl"] == "triton" and cublas else "")
        if row["impl"] == "triton":
            met = (row["speedup_vs_eager"] >= GOAL_VS_EAGER and row["speedup_vs_compile"] >= 1.0
                   and row["peak_mem_mib"] < min(eager["peak_mem_mib"], compiled["peak_mem_mib"]))
            row["meets_goal"] = "yes" if met else "no"
        else:
            row["meets_goal"] = ""
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """The rows of one run (replacing an earlier run's file for the same device)."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def plot_rows(rows: list[dict], path: str | Path) -> Path:
    """fwd+bwd median ms (top) and peak memory (bottom) vs sequence length, one column per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    full = [r for r in rows if r["direction"] == "full"]
    modes = [m for m in ("pooled", "per_token") if any(r["mode"] == m for r in full)]
    fig, axes = plt.subplots(2, len(modes), figsize=(5.5 * len(modes), 7.5), squeeze=False)
    for col, mode in enumerate(modes):
        mode_rows = [r for r in full if r["mode"] == mode]
        for ax, metric, label, yscale in ((axes[0][col], "ms_median", "median ms (fwd+bwd)", "log"),
                                          (axes[1][col], "peak_mem_mib", "peak MiB above inputs (fwd+bwd)", "linear")):
            for color, impl in zip(("tab:gray", "tab:blue", "tab:red", "tab:green"), IMPLS):
                for style, d in zip(("o-", "s--", "^:"), sorted({r["d_model"] for r in mode_rows}, reverse=True)):
                    series = sorted((r["seq_len"], r[metric]) for r in mode_rows
                                    if r["impl"] == impl and r["d_model"] == d)
                    if series:
                        ax.plot(*zip(*series), style, color=color, label=f"{impl} D={d}")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set(yscale=yscale, xlabel="sequence length", ylabel=label,
                   title=f"{mode}, batch {mode_rows[0]['batch']}, {mode_rows[0]['act_dtype']}")
            if yscale == "linear":
                ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
    fig.suptitle(f"injection op on {rows[0]['device']} (torch {rows[0]['torch']}, triton {rows[0]['triton']})")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def format_table(rows: list[dict]) -> str:
    """One line per shape and direction: the medians, Triton's ratios, memory, bandwidth and the goal."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["mode"], r["seq_len"], r["d_model"], r["direction"]), {})[r["impl"]] = r
    lines = [(f"{'mode':<9} {'T':>5} {'D':>5} {'dir':<4} {'eager ms':>9} {'compile':>9} {'triton':>9} {'cublas':>9} "
              f"{'x eager':>7} {'x comp':>7} {'x cublas':>8} {'MiB e/c/t':>17} {'triton GB/s':>15}  goal")]
    for (mode, t, d, direction), impls in by_key.items():
        e, c, k = impls["eager"], impls["compile"], impls["triton"]
        cublas = impls.get("cublas", {}).get("ms_median", float("nan"))
        vs_cublas = k["triton_vs_cublas"] if k.get("triton_vs_cublas") not in (None, "") else float("nan")
        mem = f"{e['peak_mem_mib']:.0f}/{c['peak_mem_mib']:.0f}/{k['peak_mem_mib']:.0f}"
        lines.append(f"{mode:<9} {t:>5} {d:>5} {direction:<4} {e['ms_median']:>9.3f} {c['ms_median']:>9.3f} "
                     f"{k['ms_median']:>9.3f} {cublas:>9.3f} {k['speedup_vs_eager']:>7.2f} "
                     f"{k['speedup_vs_compile']:>7.2f} {float(vs_cublas):>8.2f} "
                     f"{mem:>17} {k['gbs']:>7.0f} ({k['bw_share']:>4.0%})  {k['meets_goal']}")
    met = sum(r["meets_goal"] == "yes" for r in rows)
    total = sum(r["impl"] == "triton" for r in rows)
    lines.append(f"goal (>= {GOAL_VS_EAGER}x eager, no slower than torch.compile, lower peak memory): "
                 f"met in {met} of {total} rows")
    return "\n".join(lines)


def _peak_bandwidth() -> tuple[float, str]:
    """The device's DRAM GB/s: the spec sheet if known, else a 1 GiB device-to-device copy (read + write)."""
    import torch
    from triton.testing import do_bench

    gbs = spec_bandwidth(torch.cuda.get_device_name())
    if gbs is not None:
        return gbs, "spec sheet"
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return round(2 * src.numel() / ms / 1e6, 1), "measured: 1 GiB device-to-device copy"


def _inputs(case: Case, seed: int = 0, device: str = "cuda"):
    """h (requires grad, as at a site with earlier sites upstream), frozen readers, fp32 trainable W_k and carry."""
    import torch

    torch.manual_seed(seed)
    act, param = getattr(torch, case.act_dtype), getattr(torch, case.param_dtype)
    lead = (case.batch,) if case.mode == "pooled" else (case.batch, case.seq_len)
    h = torch.randn(case.batch, case.seq_len, case.d_model, device=device, dtype=act).requires_grad_()
    xs = [torch.randn(*lead, d, device=device, dtype=act) for d in case.widths]
    weights = [(torch.randn(case.latent, d, device=device) * d ** -0.5).to(param).requires_grad_()
               for d in case.widths]
    carry = (torch.randn(case.d_model, case.latent, device=device) * case.latent ** -0.5).to(param).requires_grad_()
    dy = torch.randn_like(h)
    return h, xs, weights, carry, dy


def _implementation(impl: str, smoke: bool = False):
    """A fresh torch.compile per measurement: the backward timed alone (retain_graph) is then compiled
    without donated buffers, as torch requires, while fwd and full keep torch's defaults."""
    import torch

    from lowmem_graph.ops import inject_reference

    if impl == "compile":
        torch._dynamo.reset()
        return torch.compile(inject_reference, backend="eager" if smoke else "inductor")
    if impl in ("triton", "cublas"):
        from lowmem_graph.kernels.inject import fused_inject_triton

        return functools.partial(fused_inject_triton, gemm="cublas") if impl == "cublas" else fused_inject_triton
    return inject_reference


def _measure(fn, leaves) -> tuple[list[float], int]:
    """(median, p20, p80) ms (do_bench on a GPU; wall-clock quantiles of a few calls on the CPU, smoke mode), then
    the peak bytes one more call allocates above what was held (memory.report.peak_during)."""
    from lowmem_graph.memory.report import peak_during

    times = _times(fn, leaves)
    for t in leaves:
        t.grad = None
    return times, peak_during(fn, leaves[0].device)


def _times(fn, leaves, repeats: int = 5) -> list[float]:
    if leaves[0].is_cuda:
        from triton.testing import do_bench

        return do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=leaves)
    import statistics
    import time

    times = []
    for _ in range(repeats + 1):                    # the first call warms up (and compiles) and is dropped
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    q = statistics.quantiles(times[1:], n=5, method="inclusive")
    return [statistics.median(times[1:]), q[0], q[3]]


def _timed_call(op, direction: str, inputs):
    """What do_bench runs for one direction; backward alone reuses one forward graph (retain_graph)."""
    h, xs, weights, carry, dy = inputs

    def forward():
        return op(h, xs, weights, carry, BLEND)

    if direction == "fwd":
        return forward
    if direction == "bwd":
        out = forward()
        return lambda: out.backward(dy, retain_graph=True)
    return lambda: forward().backward(dy)


def measure_case(case: Case, impl: str, smoke: bool = False) -> dict[str, tuple[list[float], int]]:
    """direction -> (times, peak bytes). Forward runs with autograd on, so what it saves for backward counts."""
    inputs = _inputs(case, device="cpu" if smoke else "cuda")
    h, _, weights, carry, _ = inputs
    leaves = [h, carry, *weights]
    return {d: _measure(_timed_call(_implementation(impl, smoke), d, inputs), leaves) for d in DIRECTIONS}


def run_kernel_bench(out_dir: str | Path = "bench/results", quick: bool = False, smoke: bool = False) -> Path | None:
    """Measure every case, write kernels-<device>.csv and .png under out_dir, print the table; None without CUDA
    (unless `smoke`: the CPU smoke run, whose Triton needs TRITON_INTERPRET=1 set before it is imported)."""
    import torch

    if not smoke and not torch.cuda.is_available():
        print(NO_GPU)
        return None
    import triton

    if smoke:
        name, (peak_gbs, source) = "cpu-smoke", (float("nan"), "none: CPU smoke run")
    else:
        name = torch.cuda.get_device_name()
        peak_gbs, source = _peak_bandwidth()
    meta = {"date": datetime.now().isoformat(timespec="seconds"), "device": name, "torch": torch.__version__,
            "triton": triton.__version__, "peak_gbs": peak_gbs, "peak_gbs_source": source,
            "fp32_matmul": torch.get_float32_matmul_precision()}
    rows = []
    csv_path = Path(out_dir) / f"kernels-{device_slug(name)}.csv"
    for case in bench_cases(quick, smoke):
        print(f"measuring {case.mode} T={case.seq_len} D={case.d_model} ...", flush=True)
        shape = {"mode": case.mode, "batch": case.batch, "seq_len": case.seq_len, "d_model": case.d_model,
                 "latent": case.latent, "readers": "/".join(map(str, case.widths)),
                 "act_dtype": case.act_dtype, "param_dtype": case.param_dtype}
        for impl in IMPLS:
            for direction, ((med, p20, p80), peak) in measure_case(case, impl, smoke).items():
                nbytes = min_bytes(case, direction)
                gbs = nbytes / med / 1e6
                rows.append({**meta, **shape, "impl": impl, "direction": direction, "ms_median": round(med, 4),
                             "ms_p20": round(p20, 4), "ms_p80": round(p80, 4),
                             "peak_mem_mib": round(peak / 2 ** 20, 1), "min_bytes": nbytes, "gbs": round(gbs, 1),
                             "bw_share": round(gbs / peak_gbs, 3)})
        write_csv(add_comparisons(rows), csv_path)      # after every shape: a run cut short keeps what it measured
    png_path = plot_rows(rows, Path(out_dir) / f"kernels-{device_slug(name)}.png")
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, {rows[0]['act_dtype']} activations, "
          f"{rows[0]['param_dtype']} weights; peak DRAM {peak_gbs:.0f} GB/s ({source})")
    print(format_table(rows))
    print(f"results: {csv_path}, {png_path}")
    return csv_path


def add_bench_options(parser) -> None:
    parser.add_argument("--out", default="bench/results", help="results folder (default: bench/results)")
    parser.add_argument("--quick", action="store_true", help="only the paper's shapes, no sequence-length sweep")
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny shapes (checks the "
                                                             "code, measures nothing); needs TRITON_INTERPRET=1")
