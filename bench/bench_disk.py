"""Disk to pinned slab: how fast the disk tier moves a layer group from its store file into a staging buffer.

    python bench/bench_disk.py [--group-mib 64] [--groups 8] [--rounds 5] [--dir DIR] [--out bench/results]

A store (lowmem_graph/memory/store.py, the code a run uses) of `--groups` groups of `--group-mib` MiB each is
written under --dir (default: the cache root, where a run's store lives). Three ways of reading each group into a
page-aligned host buffer (a HostSlab, page-locked on CUDA as a streamer's):

* pread: positioned reads (os.preadv) straight into the buffer, one system call per group;
* mmap: `GroupStore.read_into`, a copy from the group's view of the mapped file, page fault by page fault (what the
  streamer's reader thread does: the fastest here);
* safe_open: safetensors' own `safe_open(...).get_tensor`, then a copy into the buffer.

Each read is timed cold (the file dropped from the page cache with posix_fadvise DONTNEED first; without root
that is the best available stand-in for a first read) and warm (in the page cache), the methods interleaved in
every round; the table gives the median GB/s over rounds and the process CPU seconds per GB (a read that spends
a core competes with the compute on a small CPU). Writes disk-<device>.md under --out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmem_graph.memory.host import HostSlab  # noqa: E402
from lowmem_graph.memory.store import GroupStore  # noqa: E402


class _Layer(torch.nn.Module):
    def __init__(self, nbytes: int):
        super().__init__()
        self.register_buffer("packed", torch.randint(0, 256, (nbytes,), dtype=torch.uint8))


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-mib", type=int, default=64)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from lowmem_graph.tiny import cache_root

    folder = args.dir or cache_root() / "bench-disk"
    nbytes = args.group_mib << 20
    layers = torch.nn.ModuleList(_Layer(nbytes) for _ in range(args.groups))
    groups = [[i] for i in range(args.groups)]
    store = GroupStore(folder, f"bench-{args.group_mib}x{args.groups}", layers, groups)
    del layers      # the at-rest views keep the file mapped, nothing else
    device = "cuda" if torch.cuda.is_available() else "cpu"
    slab = HostSlab(nbytes, torch.device(device))
    if device == "cuda":
        slab.pin()
    buffer = slab.tensor

    def pread(g):
        start, n = store.span[g]
        target, done = memoryview(buffer[:n].numpy()), 0
        while done < n:
            done += os.preadv(store._fd, [target[done:]], start + done)

    def mmap_copy(g):
        store.read_into(g, buffer)

    def safe_open(g):
        from safetensors import safe_open as open_file

        with open_file(str(store.path), "pt") as f:
            buffer.copy_(f.get_tensor(f"layers.{g[0]}-{g[-1]}")[:buffer.numel()])   # padded to the store's ALIGN

    methods = {"pread": pread, "mmap": mmap_copy, "safe_open": safe_open}
    times = {(m, warm): [] for m in methods for warm in (False, True)}
    for g in groups:        # the contents, checked once: every way reads the bytes written
        for read in methods.values():
            buffer.zero_()
            read(tuple(g))
            assert torch.equal(buffer, store.views[tuple(g)])
    for _ in range(args.rounds):
        for name, read in methods.items():
            for warm in (False, True):
                if not warm:
                    _drop(store.path)
                wall, cpu = time.perf_counter(), time.process_time()
                for g in groups:
                    read(tuple(g))
                times[name, warm].append((time.perf_counter() - wall, time.process_time() - cpu))
    total = nbytes * args.groups
    rows = []
    for (name, warm), samples in times.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        rows.append(f"| {name} | {'warm (page cache)' if warm else 'cold'} | {total / wall / 1e9:.2f} | "
                    f"{cpu / (total / 1e9):.2f} |")
    title = f"{device}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    text = "\n".join([
        f"# Disk to pinned staging buffer ({title})", "",
        f"`python bench/bench_disk.py --group-mib {args.group_mib} --groups {args.groups} --rounds {args.rounds}`, "
        f"{datetime.now():%Y-%m-%d %H:%M}; store file in {folder} ({total / 2**30:.2f} GiB, {args.groups} groups); "
        "median of the rounds, methods interleaved.", "",
        "| method | cache | GB/s | CPU s per GB |", "|---|---|---:|---:|", *rows, ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"disk-{device}.md").write_text(text)
    print(text)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
