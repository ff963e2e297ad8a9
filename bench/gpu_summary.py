"""summary.md for a device check (bench/gpu_check.sh): the device, the commands, and every figure against its goal.

    python bench/gpu_summary.py --versions          print the versions that matter (torch, CUDA, bitsandbytes, ...)
    python bench/gpu_summary.py OUT_DIR             read OUT_DIR's CSVs and logs, write OUT_DIR/summary.md

Goals (from the issues; reported, never tuned to): the measured peak at or below the plan's prediction and within
15% of it, at every budget, for the training step and each node's frozen pass; the step at 6G within 1.1x of the
all-resident step; the streamer's host-to-device copies at 80% of the pinned-copy peak or more; the fused injection
forward+backward at least 1.5x eager PyTorch.
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
from pathlib import Path

PEAK_SLACK = 1.15       # the prediction may exceed the measured peak by at most this factor
STEP_GOAL = 1.1         # planned step time / all-resident step time at 6G
COPY_GOAL = 0.8         # streamer copy GB/s / pinned-copy peak GB/s
KERNEL_GOAL = 1.5       # fused injection fwd+bwd speedup over eager
DEQUANT_PAYS = 0.05     # a shared dequantised weight must save this share of a checkpointed layer (bench_dequant.PAYS)


def versions() -> str:
    lines = [f"python {platform.python_version()}"]
    for name in ("torch", "triton", "transformers", "accelerate", "bitsandbytes"):
        try:
            module = __import__(name)
            lines.append(f"{name} {module.__version__}")
        except Exception as e:          # a missing package is itself a finding
            lines.append(f"{name} missing ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            lines.append(f"CUDA {torch.version.cuda}; GPU {props.name}, {props.total_memory / 2 ** 30:.1f} GiB, "
                         f"{props.multi_processor_count} SMs")
        else:
            lines.append("CUDA: no device (CPU smoke run)")
    except Exception as e:
        lines.append(f"CUDA: {type(e).__name__}: {e}")
    return "\n".join(lines)


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict, key: str) -> float | None:
    value = row.get(key)
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _verdict(ok: bool | None, text: str) -> str:
    return {True: f"met ({text})", False: f"**missed** ({text})", None: f"not measured ({text})"}[ok]


def peak_verdict(predicted: float | None, measured: float | None) -> str:
    if predicted is None or measured is None:
        return _verdict(None, "no CUDA peak")
    if measured > predicted:
        return _verdict(False, f"measured {measured / predicted - 1:.1%} over the prediction")
    slack = predicted / measured
    return _verdict(slack <= PEAK_SLACK, f"prediction {slack - 1:.1%} above measured")


def memory_section(rows: list[dict]) -> list[str]:
    lines = ["## Memory: measured peak against the plan's prediction", "",
             "Measured peak = CUDA context (driver, before allocations) + torch's peak reserved bytes.", "",
             "| configuration | budget GiB | micro-batch | predicted MiB | measured MiB | allocated MiB | time ms | "
             "goal (<= prediction, within 15%) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        predicted, measured = _num(r, "predicted_peak_mib"), _num(r, "measured_peak_mib")
        ms = _num(r, "step_ms") or _num(r, "batch_ms")
        if predicted is None and not r.get("error"):     # a CSV row has every column, empty where unset
            continue
        budget = _num(r, "budget_gib")
        verdict = f"failed: {r['error']}" if r.get("error") else peak_verdict(predicted, measured)
        lines.append(f"| {r['config']} | {budget or 0:g} | {r.get('micro_batch', '')} | {predicted or 0:,.0f} | "
                     f"{measured or 0:,.0f} | {_num(r, 'measured_peak_allocated_mib') or 0:,.0f} | "
                     f"{ms or 0:,.1f} | {verdict} |")
    others = max((_num(r, "others_at_start_mib") or 0 for r in rows), default=0)
    if others > 64:
        lines += ["", f"Other programs and the driver held {others:,.0f} MiB of the card when the run began (NVML): "
                      "every measured peak above includes that much that is not this run's."]
    return lines


def speed_section(rows: list[dict]) -> list[str]:
    lines = ["## Step time and host-to-device copies", "",
             "| configuration | step ms (median) | x all-resident | streamed MiB/step | copy GB/s | pinned peak GB/s |"
             " copy / peak |", "|---|---|---|---|---|---|---|"]
    goals = []
    for r in rows:
        if _num(r, "step_ms") is None:
            continue
        copy, peak = _num(r, "copy_gbs"), _num(r, "pinned_copy_peak_gbs")
        share = copy / peak if copy and peak else None
        lines.append(f"| {r['config']} | {_num(r, 'step_ms'):,.1f} | {_num(r, 'step_vs_all_resident') or 0:.2f} | "
                     f"{_num(r, 'streamed_mib_per_step') or 0:,.0f} | {copy or 0:.1f} | {peak or 0:.1f} | "
                     f"{f'{share:.0%}' if share else '-'} |")
        if r["config"] == "plan 6G":
            ratio = _num(r, "step_vs_all_resident")
            goals.append(f"- step at 6G within {STEP_GOAL}x of all-resident: "
                         + _verdict(ratio <= STEP_GOAL if ratio else None, f"{ratio:.2f}x" if ratio else "no row"))
        if share is not None:
            goals.append(f"- {r['config']}: copies at >= {COPY_GOAL:.0%} of the pinned peak: "
                         + _verdict(share >= COPY_GOAL, f"{share:.0%}"))
    offload = next((r for r in rows if r["config"].startswith("accelerate")), None)
    if offload is not None:
        goals.append("- accelerate cpu_offload of the same top layers (bf16): "
                     + (f"{_num(offload, 'step_ms'):,.1f} ms per step, {_num(offload, 'step_vs_all_resident'):.2f}x "
                        "all-resident" if _num(offload, "step_ms") else f"failed: {offload.get('error')}"))
    if not any("copy GB/s" in g or "copies" in g for g in goals):
        goals.append("- copies against the pinned peak: " + _verdict(None, "no streamed copy was timed"))
    return lines + [""] + goals


def kernel_section(rows: list[dict]) -> list[str]:
    lines = ["## Fused injection kernel against eager PyTorch, torch.compile and cuBLAS GEMMs around our blend", "",
             "| mode | T | D | direction | eager ms | compile ms | triton ms | cublas ms | x eager | x compile | "
             "x cublas | peak MiB e/c/t | goal (full >= 1.5x eager) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault((r["mode"], r["seq_len"], r["d_model"], r["direction"]), {})[r["impl"]] = r
    verdicts = []
    for (mode, t, d, direction), impls in by.items():
        e, c, k, b = (impls.get(i, {}) for i in ("eager", "compile", "triton", "cublas"))
        speedup = _num(k, "speedup_vs_eager")
        goal = _verdict(speedup >= KERNEL_GOAL, f"{speedup:.2f}x") if direction == "full" and speedup else ""
        lines.append(f"| {mode} | {t} | {d} | {direction} | {_num(e, 'ms_median') or 0:.3f} | "
                     f"{_num(c, 'ms_median') or 0:.3f} | {_num(k, 'ms_median') or 0:.3f} | "
                     f"{_num(b, 'ms_median') or 0:.3f} | {speedup or 0:.2f} | "
                     f"{_num(k, 'speedup_vs_compile') or 0:.2f} | {_num(k, 'triton_vs_cublas') or 0:.2f} | "
                     f"{_num(e, 'peak_mem_mib') or 0:.0f}/"
                     f"{_num(c, 'peak_mem_mib') or 0:.0f}/{_num(k, 'peak_mem_mib') or 0:.0f} | {goal} |")
        vs_cublas = _num(k, "triton_vs_cublas")
        if mode == "per_token" and direction == "full" and vs_cublas:
            verdicts.append(f"- per-token T={t} D={d}: Triton GEMMs against cuBLAS GEMMs (bf16) around the same "
                            "blend: " + _verdict(vs_cublas >= 1.0, f"{vs_cublas:.2f}x"))
    return lines + ([""] + verdicts if verdicts else [])


def step_section(rows: list[dict]) -> list[str]:
    lines = ["## The training step: placement, streaming and the schedules (bench/bench_step.py)", "",
             "| graph | configuration | micro-batch | schedule | step ms | x plain | group copies per step |",
             "|---|---|---|---|---|---|---|"]
    goals = []
    for r in rows:
        lines.append(f"| {r['graph']} | {r['config']} | {r['micro_batch']} | {r['schedule']} | "
                     f"{_num(r, 'step_ms'):,.1f} | {_num(r, 'vs_plain'):.2f} | {_num(r, 'group_copies_per_step'):.1f} |")
        if _num(r, "vs_resident_checkpointed") is not None:
            ratio = _num(r, "vs_resident_checkpointed")
            goals.append(f"- {r['graph']}: every group streamed against every group resident (both checkpointed): "
                         + _verdict(ratio <= 1.15, f"{ratio:.2f}x; the CPU goal is 1.15x"))
    return lines + [""] + goals


def dequant_section(rows: list[dict]) -> list[str]:
    layers = [r for r in rows if r["linear"] == "layer"]
    lines = ["## Dequantisation: one shared dequantised weight per frozen NF4 linear (bench/bench_dequant.py)", "",
             f"A checkpointed layer's frozen linears per micro-batch, {layers[0]['dtype'] if layers else ''}: today "
             "(bitsandbytes' two forwards, fused or not, and a dequantisation for the input gradient) against "
             "SharedDequant (two dequantisations), and what it holds from recompute to backward. The share is three "
             "dequantisations against today's time.", "",
             "| model | tokens | today ms | shared ms | saving | dequantisation share | held MiB per layer |",
             "|---|---|---|---|---|---|---|"]
    for r in layers:
        lines.append(f"| {r['model']} | {r['tokens']} | {_num(r, 'today_ms'):,.3f} | {_num(r, 'shared_ms'):,.3f} | "
                     f"{_num(r, 'saving'):.1%} | {_num(r, 'dequantise_share'):.1%} | {_num(r, 'held_mib'):,.0f} |")
    if layers:
        best = max(layers, key=lambda r: _num(r, "saving"))
        lines += ["", f"- sharing saves at least {DEQUANT_PAYS:.0%} of a checkpointed layer's time somewhere: "
                  + _verdict(_num(best, "saving") >= DEQUANT_PAYS,
                             f"at most {_num(best, 'saving'):.1%}, {best['model']} at {best['tokens']} tokens")]
    return lines


def summarise(out_dir: Path, smoke: bool) -> Path:
    parts = [line.split() for line in (out_dir / "parts.txt").read_text().splitlines()] \
        if (out_dir / "parts.txt").exists() else []
    version_text = (out_dir / "versions.txt").read_text().strip() if (out_dir / "versions.txt").exists() else ""
    memory = sorted(out_dir.glob("memory-*.csv"))
    kernels = sorted(out_dir.glob("kernels-*.csv"))
    device = (_read(memory[0])[0].get("device") if memory else None) or (version_text.splitlines() or ["?"])[-1]
    lines = [f"# Device check: {device}", ""]
    if smoke:
        lines += ["**CPU smoke run** (no CUDA): the same code on the tiny preset; it checks the scripts, and no "
                  "figure below is a measurement worth quoting.", ""]
    lines += ["Command: `bash bench/gpu_check.sh OUT_DIR` (its parts below, each under its own time limit).", "",
              "```", version_text, "```", "", "| part | command | exit | seconds |", "|---|---|---|---|"]
    commands = {"gpu-tests": "python3 -m pytest -q -m gpu",
                "memory": "python3 bench/bench_memory.py --budgets "
                          + ("24G,2G --steps 1 --smoke" if smoke else "24G,6G,3G,2G --steps 3"),
                "kernels": "python3 bench/bench_kernels.py --quick" + (" --smoke" * smoke),
                "step": "python3 bench/bench_step.py --graphs " + ("tiny --repeats 1" if smoke else
                                                                    "tiny,reduced --repeats 3"),
                "dequant": "python3 bench/bench_dequant.py " + ("--scale 16 --tokens 64 --repeats 1" if smoke
                                                                else "--tokens 512,2048,4096 --repeats 10"),
                "calibrate": "python3 bench/calibrate.py" + (" --smoke" * smoke)}
    for name, rc, seconds in (p[:3] for p in parts if len(p) >= 3):
        status = {"0": "0", "124": "124 (timed out)", "137": "137 (killed)"}.get(rc, rc)
        lines.append(f"| {name} | `{commands.get(name, '')}` | {status} | {seconds} |")
    lines.append("")
    if memory:
        rows = _read(memory[0])
        lines += memory_section(rows) + [""] + speed_section(rows) + [""]
        host = next((r for r in rows if _num(r, "predicted_host_mib")), None)
        if host is not None:
            lines += [f"Host memory: peak RSS of the benchmark process {_num(host, 'host_peak_rss_mib'):,.0f} MiB; "
                      f"the plans predict {_num(host, 'predicted_host_mib'):,.0f} MiB for a training run "
                      "(which also holds the prefix cache's rows).", ""]
    else:
        lines += ["## Memory", "", "No memory CSV: see the memory part's log.", ""]
    lines += kernel_section(_read(kernels[0])) if kernels else ["## Kernels", "", "No kernel CSV: see its log."]
    steps = sorted(out_dir.glob("step-*.csv"))
    lines += [""] + (step_section(_read(steps[0])) if steps else ["## Step", "", "No step CSV: see its log."])
    dequant = sorted(out_dir.glob("dequant-*.csv"))
    lines += [""] + (dequant_section(_read(dequant[0])) if dequant else
                     ["## Dequantisation", "", "No dequantisation CSV: see its log."])
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument("--versions", action="store_true", help="print the versions and the device, then exit")
    parser.add_argument("--smoke", action="store_true", help="the run was the CPU smoke run")
    args = parser.parse_args(argv)
    if args.versions:
        print(versions())
        return 0
    if not args.out_dir:
        parser.error("OUT_DIR is required")
    try:
        print(summarise(Path(args.out_dir), args.smoke).read_text())
    except Exception as e:          # a summary that fails still says so in summary.md, with what it could not read
        import traceback

        (Path(args.out_dir) / "summary.md").write_text(
            f"# Device check\n\nThe summary failed: {type(e).__name__}: {e}\n\n```\n{traceback.format_exc()}```\n")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
