"""The disk tier's store: one node's layer groups that live on disk (memory/disk.py chooses them), in the node cache.

Each group is one uint8 tensor of a safetensors file, its bytes laid out exactly as a streamer lays the group out in
its slab (stream._layout), so a group moves from the file into a pinned staging buffer with one read and from there
to a device slot with one copy. The file is written once, atomically (files.atomic_file: a killed run leaves only a
temporary, which the next one removes), named by what it holds (the node's identity, which names its exact
weights, and the groups' layout), and carries the SHA-256 of every group, checked when a later run opens it.

At rest the groups' tensors are views into the file's pages (a private, read-only-in-practice mmap): page cache
that the kernel can drop, not host memory the run holds. A streamer's reader thread reads a group into its pinned
staging buffer with positioned reads (`os.preadv`), not a copy from that view: read from the disk (the page cache
dropped and checked), 1.70-1.86 GB/s against 1.48-1.55 for the copy from the mapping, with the same CPU time, and
the pages it read stay droppable, where a page the copy faulted in stays mapped into the process and survives
posix_fadvise DONTNEED (bench/bench_disk.py, bench/results/disk-cpu.md).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import sys
from pathlib import Path

import torch

HEADER = 8      # safetensors: a little-endian u64 header length, the JSON header, then the data


class GroupStore:
    """`groups` (lists of layer indices) of `layers`, on disk under `folder`; `key` names the weights. Opening it
    rebinds those layers' tensors to views of the file (their host copies can go)."""

    def __init__(self, folder: Path, key: str, layers: torch.nn.ModuleList, groups: list[list[int]]):
        from .stream import _layout, _sites

        self.groups = [tuple(g) for g in groups]
        sites = {g: _sites([layers[i] for i in g]) for g in self.groups}
        layouts = {g: _layout(sites[g]) for g in self.groups}
        shape = [(g, [(str(t.dtype), tuple(t.shape)) for _, _, t in sites[g]], layouts[g]) for g in self.groups]
        digest = hashlib.sha256(json.dumps([key, shape], default=str).encode()).hexdigest()
        self.path = Path(folder) / f"groups-{digest[:24]}.safetensors"
        if not self._whole():
            self._write(sites, layouts)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)    # private: a stray write stays in memory
        whole = torch.frombuffer(self._map, dtype=torch.uint8)
        self.span = {g: (self._data + begin, end - begin) for g, (begin, end) in self._offsets.items()}
        self.views = {g: whole[start: start + n] for g, (start, n) in self.span.items()}
        for g in self.groups:
            for (owner, attr, t), offset in zip(sites[g], layouts[g][0]):
                view = self.views[g][offset: offset + t.nbytes].view(t.dtype).view(t.shape)
                setattr(owner, attr, view)

    def read_into(self, group, buffer: torch.Tensor) -> int:
        """The group's bytes into `buffer` (uint8, host, contiguous, at least that long), read from the file;
        returns how many. A file cut short raises EOFError here (a copy from the mapping would die of SIGBUS)."""
        start, n = self.span[tuple(group)]
        target, done = memoryview(buffer[:n].numpy()), 0
        while done < n:
            got = os.preadv(self._fd, [target[done:]], start + done)
            if not got:
                raise EOFError(f"{self.path} ends before group {tuple(group)} does")
            done += got
        return n

    def _whole(self) -> bool:
        """Whether the file is there with every group's bytes as written (a damaged one is removed)."""
        if not self.path.is_file():
            return False
        try:
            self._read_header()
            with open(self.path, "rb") as f:
                for g, (begin, end) in self._offsets.items():
                    f.seek(self._data + begin)
                    if hashlib.sha256(f.read(end - begin)).hexdigest() != self._digests[str(list(g))]:
                        raise ValueError(f"group {g} does not match its checksum")
            return True
        except (OSError, ValueError, KeyError, struct.error) as e:      # struct.error: a file cut short
            print(f"lowmem-graph: the disk tier's copy {self.path} is damaged ({e}): writing it again", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            return False

    def _write(self, sites, layouts) -> None:
        from ..files import atomic_file, remove_stale_temps, save_file

        tensors, digests = {}, {}
        for g in self.groups:
            packed = torch.zeros(layouts[g][1], dtype=torch.uint8)
            for (_, _, t), offset in zip(sites[g], layouts[g][0]):
                packed[offset: offset + t.nbytes].copy_(t.detach().reshape(-1).view(torch.uint8))
            tensors[_name(g)] = packed
            digests[str(list(g))] = hashlib.sha256(packed.numpy().tobytes()).hexdigest()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path.parent)
        with atomic_file(self.path) as tmp:
            save_file(tensors, tmp, metadata={"digests": json.dumps(digests)})
        self._read_header()

    def _read_header(self) -> None:
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(HEADER))
            header = json.loads(f.read(length))
        self._data = HEADER + length
        self._digests = json.loads(header["__metadata__"]["digests"])
        self._offsets = {g: tuple(header[_name(g)]["data_offsets"]) for g in self.groups}

    def close(self) -> None:
        """The file stays (later runs reuse it); the views into it must be gone or rebound first."""
        os.close(self._fd)


def _name(group) -> str:
    return f"layers.{group[0]}-{group[-1]}"
