"""Epoch time with and without the frozen-prefix cache, in one run on one device.

    python bench/bench_prefix_cache.py [--preset tiny] [--limit 256] [--epochs 3] [--device auto]

With the cache a training step runs only the refiners' layers from the injection depth up, the projections and
the output node; without it every step runs all readers and the refiners' lower layers too. Reported: the
median training-epoch time of each (evaluation excluded), their ratio, and the one-off cost of the frozen pass.
Rows are appended to bench/results/prefix-cache-<device>.csv.
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowmem_graph.spec import load_preset
from lowmem_graph.train import TrainConfig, Trainer


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"CPU {line.split(':', 1)[1].strip()} x{torch.get_num_threads()} threads"
    return f"CPU {platform.processor()}"


def epoch_seconds(trainer: Trainer, epochs: int) -> list[float]:
    times = []
    cfg = trainer.cfg
    for epoch in range(epochs):
        order = torch.randperm(len(trainer.train_set), generator=torch.Generator().manual_seed(epoch))
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(trainer.steps_per_epoch):
            trainer.train_step([trainer.train_set[k] for k in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]])
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--limit", type=int, default=256, help="training questions")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per mode (median reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    spec = load_preset(args.preset)
    base = {**spec.train, "limit_train": args.limit, "limit_eval": 8, "device": args.device}
    results = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for mode in ("no cache", "cache"):
            cfg = TrainConfig.from_dict({**base, "prefix_cache": mode == "cache", "cache_dir": cache_dir})
            start = time.perf_counter()
            trainer = Trainer(spec, cfg, Path(cache_dir) / "run", progress=False, log=lambda *_: None)
            setup = time.perf_counter() - start
            times = epoch_seconds(trainer, args.epochs)
            results[mode] = (statistics.median(times), times, setup)
            print(f"{mode:>9}: median epoch {results[mode][0]:.2f} s over {args.epochs} "
                  f"({', '.join(f'{t:.2f}' for t in times)}); setup incl. frozen pass {setup:.1f} s", flush=True)
            del trainer
    ratio = results["no cache"][0] / results["cache"][0]
    device = device_name(TrainConfig(device=args.device).resolved_device())
    print(f"epoch time without / with the prefix cache: {ratio:.2f}x  ({device}, preset {args.preset}, "
          f"{args.limit} questions, batch {base['batch_size']})")
    out = Path(args.out) / f"prefix-cache-{''.join(c if c.isalnum() else '-' for c in device.lower())[:60]}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date", "device", "torch", "preset", "questions", "batch", "epochs",
                             "epoch_s_no_cache", "epoch_s_cache", "ratio", "setup_s_cache"])
        writer.writerow([time.strftime("%Y-%m-%d"), device, torch.__version__, args.preset, args.limit,
                         base["batch_size"], args.epochs, f"{results['no cache'][0]:.3f}",
                         f"{results['cache'][0]:.3f}", f"{ratio:.3f}", f"{results['cache'][2]:.1f}"])
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
