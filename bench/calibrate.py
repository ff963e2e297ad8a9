"""Measure the machine this runs on for the planner's cost model (lowmem_graph/memory/cost.py).

    python bench/calibrate.py [--device cpu|cuda] [--threads N] [--out FILE]

Writes a device profile (lowmem_graph/memory/devices.py) into the cache root, `devices/<device>.json`, where
every plan made for this device then finds it (`plan`, `train --gpu-mem`), and to `--out` if given (`plan
--profile FILE` reads it). What it measures, each the median of a few repeats after a warm-up:

* host-to-device copies from pinned and from ordinary memory (on a CPU: a memory copy, what a streamer's slab ->
  slot copy is there);
* a matmul's FLOP/s in each compute dtype (fp32, bf16), at LLM-like shapes scaled to the device;
* NF4 dequantisation (bitsandbytes), weights per second; and a first run's NF4 quantisation (a bf16 weight from
  host memory quantised there, the packed result back);
* the fixed cost of one decoder layer run (a tiny Llama trained through, where launches and Python are all there
  is), plainly and as a planned run calls a checkpointed layer (through our hooks and the group's checkpoint);
* device memory bandwidth (a large copy on the device), disk reads (a file written, flushed and dropped from the
  page cache with posix_fadvise before it is read back as the disk tier reads, /proc/self/io checking the disk).

On a CPU the times are process CPU time (`time.process_time`) when one thread computes, so that other programs on
a shared machine do not count; wall time otherwise. Pin threads with `--threads 1` to compare with benchmarks that
do (bench/bench_plan_time.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem_graph.memory import devices  # noqa: E402


def clock(device: torch.device):
    """Process CPU time where one CPU thread does the work, else wall time (synchronised on CUDA)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def seconds(fn, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of `fn()` after one warm-up."""
    now = clock(device)
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(now() - start)
    return max(statistics.median(times), 1e-9)


def copy_rates(device: torch.device, nbytes: int) -> tuple[float, float]:
    """(pinned, pageable) host-to-device bytes/s."""
    source = torch.empty(nbytes, dtype=torch.uint8)
    source.fill_(1)
    if device.type != "cuda":
        target = torch.empty_like(source)
        rate = nbytes / seconds(lambda: target.copy_(source), device)
        return rate, rate
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    pinned = source.pin_memory()
    return (nbytes / seconds(lambda: target.copy_(pinned, non_blocking=True), device),
            nbytes / seconds(lambda: target.copy_(source), device))


def gemm_rate(device: torch.device, dtype: torch.dtype, tokens: int, width: int) -> float:
    a = torch.randn(tokens, width, device=device).to(dtype)
    b = torch.randn(width, 4 * width, device=device).to(dtype)
    return 2 * tokens * width * 4 * width / seconds(lambda: a @ b, device)


def dequant_rate(device: torch.device, width: int) -> float:
    import bitsandbytes.functional as F

    weight = torch.randn(4 * width, width, device=device, dtype=torch.bfloat16 if device.type == "cuda"
                         else torch.float32)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    return weight.numel() / seconds(lambda: F.dequantize_4bit(packed, state), device)


def quantise_rate(device: torch.device, width: int) -> float:
    """Weights/s a first run quantises to NF4 there, as quantise.py does: a checkpoint's bf16 weight from host
    memory cast to the compute dtype on the device, quantised (double quantisation), and the packed result back."""
    import bitsandbytes.functional as F

    weight = torch.randn(4 * width, width, dtype=torch.bfloat16)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32

    def once():
        packed, state = F.quantize_4bit(weight.to(device=device, dtype=compute), blocksize=64, quant_type="nf4",
                                        compress_statistics=True)
        packed.to("cpu"), state.to("cpu")

    return weight.numel() / seconds(once, device)


def launch_cost(device: torch.device) -> tuple[float, float]:
    """(launch, hooks): seconds of fixed cost per layer run, and what a checkpointed layer adds to them per step.
    A tiny frozen Llama (1 x 8 tokens, where the work is all overhead) trained through, 6 layers against 2, called
    plainly (per layer and forward's worth: a backward counts twice in the cost model, 3 in all), then as a planned
    run calls a checkpointed layer: in groups of two held by a streamer (every group resident), through the hook
    registry (lowmem_graph/hooks.py) and the group's checkpoint; beyond its 4 runs' launches (a forward, its
    recompute, a backward), that is `hooks`."""
    from transformers import LlamaConfig, LlamaModel

    from lowmem_graph.memory.stream import LayerStreamer

    def step(layers: int, hooked: bool) -> float:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=layers, vocab_size=128)
        model = LlamaModel(config).to(device).requires_grad_(False)
        x = torch.randn(1, 8, 64, device=device, requires_grad=True)
        groups = [[i, i + 1] for i in range(0, layers, 2)]
        with LayerStreamer(model.layers, groups, resident=range(len(groups)), device=device,
                           plain=() if hooked else range(len(groups))):
            return seconds(lambda: model(inputs_embeds=x).last_hidden_state.sum().backward(), device, repeats=20)

    launch = (step(6, False) - step(2, False)) / (4 * 3)
    hooked = (step(6, True) - step(2, True)) / 4
    return launch, max(hooked - 4 * launch, 0.0)


def memory_rate(device: torch.device, nbytes: int) -> float:
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * nbytes / seconds(lambda: target.copy_(source), device)


def disk_rate(folder: Path, nbytes: int) -> float:
    """Bytes/s reading a file from the disk as a streamer's reader does (store.GroupStore.read_into: positioned
    reads into a page-aligned buffer): written, flushed, dropped from the page cache (posix_fadvise DONTNEED; nothing
    maps it, which would keep its pages) before each read. Where /proc/self/io says a read came from the page cache
    instead (tmpfs), the figure is that of the page cache, and a line says so."""
    from lowmem_graph.memory.host import HostSlab
    from lowmem_graph.memory.store import pread_into

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix="calibrate-", delete=True) as f:
        f.write(os.urandom(1 << 20) * (nbytes >> 20))
        f.flush()
        os.fsync(f.fileno())
        slab = HostSlab(nbytes)
        buffer = memoryview(slab.tensor.numpy())
        times, fetched = [], []
        for _ in range(3):
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            before, start = _read_bytes(), time.perf_counter()
            pread_into(f.fileno(), buffer, 0)
            times.append(time.perf_counter() - start)
            fetched.append(None if before is None else _read_bytes() - before)
    if None not in fetched and min(fetched) < nbytes:
        print(f"calibrate: the disk reads came from the page cache ({min(fetched) / nbytes:.0%} from the device; "
              f"{folder} on tmpfs?): disk_read is the page cache's rate", file=sys.stderr)
    return nbytes / statistics.median(times)


def _read_bytes() -> int | None:
    """Bytes this process has had fetched from block devices (/proc/self/io); None where that is not kept."""
    try:
        with open("/proc/self/io") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("read_bytes")), None)
    except OSError:
        return None


def measure(device: str = "cpu", small: bool | None = None, smoke: bool = False) -> devices.DeviceProfile:
    """This machine's profile for `device` (small shapes on a CPU; `smoke`: tiny ones, a check of the script)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    small = not cuda if small is None else small
    width, tokens, nbytes = (1024, 512, 256 << 20) if small else (4096, 8192, 1 << 30)
    if smoke:
        width, tokens, nbytes = 256, 64, 16 << 20
    pinned, pageable = copy_rates(device, nbytes)
    gemm = {name: gemm_rate(device, dtype, tokens, width)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    name = devices.device_name(f"cuda:{device.index or 0}" if cuda else "cpu")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    launch, hooks = launch_cost(device)
    return devices.DeviceProfile(
        name, pinned, pageable, gemm, dequant_rate(device, width), launch,
        disk_rate(devices.profiles_dir(), nbytes), memory_rate(device, nbytes),
        compute_dtype="bf16" if cuda else "fp32", copies_overlap=cuda, hooks=hooks,
        nf4_quantise=quantise_rate(device, width),
        source=f"measured by bench/calibrate.py on {time.strftime('%Y-%m-%d')}: {name}"
               + ("" if cuda else f" ({cpu})") + f", {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}, torch {torch.__version__}")


def describe(profile: devices.DeviceProfile) -> str:
    return (f"{profile.name}: copies {profile.h2d_pinned / 1e9:.1f} GB/s pinned, {profile.h2d_pageable / 1e9:.1f} "
            f"pageable; GEMM " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in profile.gemm.items())
            + f"; NF4 dequant {profile.nf4_dequant / 1e9:.2f} G weights/s; launch {profile.launch * 1e6:.0f} us/layer"
              f" (+ {profile.hooks * 1e6:.0f} us per checkpointed layer and step);"
              f" memory {profile.memory / 1e9:.1f} GB/s; disk {profile.disk_read / 1e9:.2f} GB/s; NF4 quantisation "
              f"{profile.nf4_quantise / 1e9:.3f} G weights/s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--out", help="also write the profile here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing "
                                                             "(and writes no profile into the cache root)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = measure(args.device, smoke=args.smoke)
    print(describe(profile))
    print(json.dumps(profile.to_dict(), indent=1))
    # a smoke run's figures are no measurement: plans must not find them
    home = devices.profiles_dir() / f"{devices.slug(profile.name)}.json"
    written = [] if args.smoke else [devices.save(profile, home)]
    if args.out:
        written.append(devices.save(profile, args.out))
    print("written: " + (", ".join(map(str, written)) or "nothing (a smoke run)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
