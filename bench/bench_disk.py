"""Disk to pinned slab: how fast the disk tier moves a layer group from its store file into a staging buffer.

    python bench/bench_disk.py [--group-mib 128] [--groups 8] [--rounds 7] [--dir DIR] [--out bench/results]

A store (lowmem_graph/memory/store.py, the code a run uses) of `--groups` groups of `--group-mib` MiB each is
written under --dir (default: the cache root, where a run's store lives). Four ways of reading each group into a
page-aligned host buffer (a HostSlab, page-locked on CUDA as a streamer's):

* pread: positioned reads (os.preadv) through the page cache straight into the buffer;
* mmap: a copy from the group's view of the store's mapped file, page fault by page fault;
* safe_open: safetensors' own `safe_open(...).get_tensor`, then a copy into the buffer;
* O_DIRECT: positioned reads that bypass the page cache (the file range widened to whole pages; the group's bytes
  land a few bytes into the buffer).

`GroupStore.read_into`, what the streamer's reader thread calls, is one of them (named in the table).

Cold rounds: every mapping of the file is released first (the store's own pages unmapped with madvise
MADV_DONTNEED; a page mapped into a process is one posix_fadvise DONTNEED cannot drop), then the file is dropped
from the page cache, and what is still resident is counted with mincore. Each read's bytes fetched from the block
device (/proc/self/io read_bytes) are recorded next to its time, so the table shows that a cold row read the disk
and a warm (page cache) row did not. The methods are interleaved in every round; the table gives the median GB/s
over rounds and the process CPU seconds per GB (a read that spends a core competes with the compute on a small
CPU). Writes disk-<device>.md under --out.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmem_graph.memory.host import PAGE, HostSlab  # noqa: E402
from lowmem_graph.memory.store import GroupStore, pread_into  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


class _Layer(torch.nn.Module):
    def __init__(self, nbytes: int):
        super().__init__()
        self.register_buffer("packed", torch.randint(0, 256, (nbytes,), dtype=torch.uint8))


def resident(path: Path) -> float:
    """The share of the file's pages in the page cache (mincore on a fresh mapping that touches nothing)."""
    n = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        pages = -(-n // PAGE)
        vec = (ctypes.c_ubyte * pages)()
        try:
            if _libc.mincore(ctypes.c_void_p(addr), n, vec):
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            _libc.munmap(ctypes.c_void_p(addr), n)
        return sum(b & 1 for b in vec) / pages
    finally:
        os.close(fd)


def read_bytes() -> int:
    """Bytes this process has had fetched from block devices (page-cache hits do not count)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def drop(store: GroupStore) -> float:
    """The store file out of the page cache; returns the share still resident (0.0 when the drop worked)."""
    store._map.madvise(mmap.MADV_DONTNEED)      # unmap the store's pages: mapped pages survive a DONTNEED
    fd = os.open(store.path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident(store.path)


def filesystem(folder: Path) -> str:
    """The mount holding `folder` and its filesystem type, from /proc/mounts."""
    best = ("?", "?", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, point, kind = line.split()[:3]
        if str(folder.resolve()).startswith(point.rstrip("/") + "/") and len(point) >= len(best[1]):
            best = (device, point, kind)
    return f"{best[2]} on {best[0]} (mounted at {best[1]})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-mib", type=int, default=128)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from lowmem_graph.tiny import cache_root

    folder = args.dir or cache_root() / "bench-disk"
    nbytes = args.group_mib << 20
    layers = torch.nn.ModuleList(_Layer(nbytes) for _ in range(args.groups))
    groups = [(i,) for i in range(args.groups)]
    store = GroupStore(folder, f"bench-{args.group_mib}x{args.groups}", layers, [list(g) for g in groups])
    del layers      # the at-rest views keep the file mapped, nothing else
    device = "cuda" if torch.cuda.is_available() else "cpu"
    slab = HostSlab(nbytes + 2 * PAGE, torch.device(device))      # room for O_DIRECT's widened range
    if device == "cuda":
        slab.pin()
    buffer = slab.tensor
    try:
        direct = os.open(store.path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:        # some file systems refuse it (tmpfs before Linux 6.6)
        direct, missing = None, f" O_DIRECT: refused by this filesystem ({e.strerror})."

    def pread(g):
        start, n = store.span[g]
        pread_into(store._fd, memoryview(buffer[:n].numpy()), start)
        return buffer[:n]

    def mmap_copy(g):
        n = store.span[g][1]
        buffer[:n].copy_(store.views[g])
        return buffer[:n]

    def safe_open(g):
        from safetensors import safe_open as open_file

        with open_file(str(store.path), "pt") as f:
            t = f.get_tensor(f"layers.{g[0]}-{g[-1]}")[:store.span[g][1]]     # padded to the store's ALIGN
            buffer[:t.numel()].copy_(t)
        return buffer[:t.numel()]

    def o_direct(g):
        start, n = store.span[g]
        begin, end = start // PAGE * PAGE, -(-(start + n) // PAGE) * PAGE
        pread_into(direct, memoryview(buffer[:end - begin].numpy()), begin, start + n - begin)
        return buffer[start - begin: start - begin + n]

    methods = {"pread": pread, "mmap": mmap_copy, "safe_open": safe_open, "O_DIRECT": o_direct}
    if direct is None:
        del methods["O_DIRECT"]
    for g in groups:        # the contents, checked once: every way reads the bytes written
        for read in methods.values():
            buffer.zero_()
            assert torch.equal(read(g), store.views[g])
        buffer.zero_()
        store.read_into(g, buffer)
        assert torch.equal(buffer[:store.span[g][1]], store.views[g])
    load = [os.getloadavg()[0]]
    samples = {(m, warm): [] for m in methods for warm in (False, True)}
    left = []       # share of the file still resident after each drop
    for _ in range(args.rounds):
        for name, read in methods.items():
            for warm in (False, True):
                if not warm:
                    left.append(drop(store))
                fetched, wall, cpu = read_bytes(), time.perf_counter(), time.process_time()
                for g in groups:
                    read(g)
                samples[name, warm].append((time.perf_counter() - wall, time.process_time() - cpu,
                                            read_bytes() - fetched))
        load.append(os.getloadavg()[0])
    if direct is not None:
        os.close(direct)
    total = nbytes * args.groups
    rows = []
    for (name, warm), got in samples.items():
        wall, cpu, disk = (statistics.median(s[i] for s in got) for i in range(3))
        rows.append(f"| {name} | {'warm' if warm else 'cold'} | {total / wall / 1e9:.2f} | "
                    f"{min(total / s[0] for s in got) / 1e9:.2f}-{max(total / s[0] for s in got) / 1e9:.2f} | "
                    f"{cpu / (total / 1e9):.2f} | {disk / total:.2f} |")
    uses = "pread" if "preadv" in GroupStore.read_into.__code__.co_names else "mmap"
    title = f"{device}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    text = "\n".join([
        f"# Disk to pinned staging buffer ({title})", "",
        f"`python bench/bench_disk.py --group-mib {args.group_mib} --groups {args.groups} --rounds {args.rounds}`, "
        f"{datetime.now():%Y-%m-%d %H:%M}; store file in {folder}, {filesystem(folder)} ({total / 2**30:.2f} GiB, "
        f"{args.groups} groups); median of the rounds, methods interleaved. Before each cold read the file was "
        f"dropped and at most {max(left):.1%} of it was still resident (mincore); 'from disk' is the read's "
        f"/proc/self/io read_bytes over the bytes read. Load average (1 min) {min(load):.1f}-{max(load):.1f} on "
        f"{os.cpu_count()} CPUs during the rounds. `GroupStore.read_into` uses {uses}."
        + ("" if direct is not None else missing), "",
        "| method | cache | GB/s (median) | GB/s (range) | CPU s per GB | from disk |",
        "|---|---|---:|---:|---:|---:|", *rows, ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"disk-{device}.md").write_text(text)
    print(text)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
