"""The disk tier's store: one node's layer groups that live on disk (memory/disk.py chooses them), in the node cache.

Each group is one uint8 tensor of a safetensors file, its bytes laid out exactly as a streamer lays the group out in
its slab (stream._layout), so a group moves from the file into a pinned staging buffer with one read and from there
to a device slot with one copy. The file is written once, atomically (files.atomic_file: a killed run leaves only a
temporary, which the next one removes), named by what it holds (the node's identity, which names its exact
weights, and the groups' layout), and carries that name's key and the SHA-256 of every group. Every group is
padded to ALIGN bytes and the data starts at a multiple of ALIGN, so every group's view, and every tensor in it
(stream._layout), is aligned by construction.

At rest the groups' tensors are views into the file's pages (a private, read-only-in-practice mmap): page cache
that the kernel can drop, not host memory the run holds. A streamer's reader thread reads a group into its pinned
staging buffer with positioned reads (`os.preadv`), not a copy from that view: read from the disk (the page cache
dropped and checked), 1.70-1.86 GB/s against 1.48-1.55 for the copy from the mapping, with the same CPU time, and
the pages it read stay droppable, where a page the copy faulted in stays mapped into the process and survives
posix_fadvise DONTNEED (bench/bench_disk.py, bench/results/disk-cpu.md).

Opening checks the size always, and the digests only where no stamp vouches for the file: the stamp beside it records
the file's inode, size, mtime and ctime (ctime changes on every write and cannot be set back) as they were when its
digests were last known to match, and vouches while they are still so, provided that check came RACY_NS or more after
the file's mtime (a write within the same tick of a coarse file clock leaves the times as they were: git's "racily
clean" entries). A store just written has its mtime set back by RACY_NS, so that any later write moves it: it is
hashed once, when written. `verify=True` checks the digests whatever the stamp says.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
import sys
import time
from pathlib import Path

import torch

from .stream import ALIGN, _align, _layout, _sites

HEADER = 8      # safetensors: a little-endian u64 header length, the JSON header, then the data
RACY_NS = 2 * 10 ** 9   # a stamp vouches for a file whose mtime is this long before its check (FAT's clock: 2 s)


class GroupStore:
    """`groups` (lists of layer indices) of `layers`, on disk under `folder`; `key` names the weights. Opening it
    rebinds those layers' tensors to views of the file (their host copies can go). `verify`: check every group's
    digest even where the stamp vouches for the file."""

    def __init__(self, folder: Path, key: str, layers: torch.nn.ModuleList, groups: list[list[int]],
                 verify: bool = False):
        self.groups = [tuple(g) for g in groups]
        sites = {g: _sites([layers[i] for i in g]) for g in self.groups}
        layouts = {g: _layout(sites[g]) for g in self.groups}
        shape = [(g, [(str(t.dtype), tuple(t.shape)) for _, _, t in sites[g]], layouts[g]) for g in self.groups]
        digest = hashlib.sha256(json.dumps([key, shape], default=str).encode()).hexdigest()
        self.path = Path(folder) / f"groups-{digest[:24]}.safetensors"
        self._key = digest      # recorded in the file: another store's file put in its place is not taken for it
        self.stamp = self.path.with_suffix(".stamp")
        self.hashed = 0         # groups whose digest this opening computed (on writing, or checking)
        if not self._whole(verify):
            self._write(sites, layouts)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)    # private: a stray write stays in memory
        whole = torch.frombuffer(self._map, dtype=torch.uint8)
        self.span = {g: (self._data + self._offsets[g][0], layouts[g][1]) for g in self.groups}
        self.views = {g: whole[start: start + n] for g, (start, n) in self.span.items()}
        for g in self.groups:
            for (owner, attr, t), offset in zip(sites[g], layouts[g][0]):
                view = self.views[g][offset: offset + t.nbytes].view(t.dtype).view(t.shape)
                setattr(owner, attr, view)

    def read_into(self, group, buffer: torch.Tensor) -> int:
        """The group's bytes into `buffer` (uint8, host, contiguous, at least that long), read from the file;
        returns how many. A file cut short raises EOFError here (a copy from the mapping would die of SIGBUS)."""
        start, n = self.span[tuple(group)]
        try:
            pread_into(self._fd, memoryview(buffer[:n].numpy()), start)
        except EOFError:
            raise EOFError(f"{self.path} ends before group {tuple(group)} does") from None
        return n

    def _whole(self, verify: bool) -> bool:
        """Whether the file is there, of its size, and with every group's bytes as written (by its stamp, or by
        their digests, after which the stamp is renewed); a damaged one is removed."""
        if not self.path.is_file():
            return False
        try:
            self._read_header()
            if self._header_key != self._key:
                raise ValueError("it is another store's file" if self._header_key else
                                 "it was written in an older layout, without its key")
            before, checked = os.stat(self.path), time.time_ns()
            if before.st_size != self._data + max((end for _, end in self._offsets.values()), default=0):
                raise ValueError("its size is not what its header says")
            if not verify and self._vouched(before):
                return True
            with open(self.path, "rb") as f:
                for g, (begin, end) in self._offsets.items():
                    f.seek(self._data + begin)
                    self.hashed += 1
                    if hashlib.sha256(f.read(end - begin)).hexdigest() != self._digests[str(list(g))]:
                        raise ValueError(f"group {g} does not match its checksum")
            self._stamp(before, checked)    # as it was before the reads: a write during them is not vouched for
            return True
        except (OSError, ValueError, KeyError, struct.error) as e:      # struct.error: a file cut short
            print(f"lowmem-graph: the disk tier's copy {self.path} is damaged ({e}): writing it again", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            self.stamp.unlink(missing_ok=True)
            return False

    def _vouched(self, st: os.stat_result) -> bool:
        """Whether the stamp is of the file as it is (`st`), checked RACY_NS or more after its mtime."""
        try:
            stamp = json.loads(self.stamp.read_text())
            return stamp["file"] == _state(st) and stamp["checked"] - st.st_mtime_ns >= RACY_NS
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _stamp(self, st: os.stat_result, checked: int) -> None:
        """Record the file as it was (`st`), its digests known to match at `checked` (ns)."""
        from ..files import atomic_file

        with atomic_file(self.stamp) as tmp:
            tmp.write_text(json.dumps({"file": _state(st), "checked": checked}))

    def _write(self, sites, layouts) -> None:
        from ..files import atomic_file, remove_stale_temps

        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path.parent)
        with atomic_file(self.path) as tmp:
            self._save(tmp, sites, layouts)
        self._read_header()
        # sealed, hashed as written: its mtime set back, so that any later write moves it and the stamp vouches now
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns - RACY_NS))
        self._stamp(os.stat(self.path), time.time_ns())

    def _save(self, path: Path, sites, layouts) -> None:
        """A safetensors file of one uint8 tensor per group, each padded to ALIGN bytes, the data starting at a
        multiple of ALIGN. Each tensor is written and hashed from where it is (at load, views of the node cache's
        pages), never packed into a group in memory: glibc keeps freed chunks of tens of MB in its heap, so packed
        groups held one more group of anonymous memory each, up to the node's groups on disk. The pages written
        from are handed back as they go (_let_go). The header, whose digests have a fixed length, is written again
        at the end with them."""
        header, offset = {}, 0
        for g in self.groups:
            size = _align(layouts[g][1])
            header[_name(g)] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
            offset += size
        digests = {str(list(g)): "0" * 64 for g in self.groups}

        def encoded() -> bytes:
            text = json.dumps({"__metadata__": {"key": self._key, "digests": json.dumps(digests)}, **header}).encode()
            return text + b" " * (-(HEADER + len(text)) % ALIGN)

        first, read = encoded(), []       # the address ranges written from: handed back as they go, then merged
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(first)) + first)
            for g in self.groups:
                digest, end = hashlib.sha256(), 0
                for (_, _, t), at in zip(sites[g], layouts[g][0]):
                    if at < end or not t.nbytes:        # an alias, written with its tensor; or nothing
                        continue
                    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                    for chunk in (bytes(at - end), data):
                        digest.update(chunk)
                        f.write(chunk)
                    if t.is_contiguous():       # else `data` is a copy, freed next
                        read.append((data.ctypes.data, data.ctypes.data + data.nbytes))
                        _let_go(read[-1:])
                    end = at + t.nbytes
                tail = bytes(header[_name(g)]["shape"][0] - end)
                digest.update(tail)
                f.write(tail)
                digests[str(list(g))] = digest.hexdigest()
                self.hashed += 1
            f.seek(HEADER)
            f.write(encoded())
        _let_go(read)

    def _read_header(self) -> None:
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(HEADER))
            header = json.loads(f.read(length))
        self._data = HEADER + length
        self._digests = json.loads(header["__metadata__"]["digests"])
        self._header_key = header["__metadata__"].get("key")
        self._offsets = {g: tuple(header[_name(g)]["data_offsets"]) for g in self.groups}

    def close(self) -> None:
        """The file stays (later runs reuse it); the views into it must be gone or rebound first."""
        os.close(self._fd)


def pread_into(fd: int, target: memoryview, offset: int, need: int | None = None) -> None:
    """`target` (or its first `need` bytes) filled from the file at `offset` with positioned reads, however many
    the kernel takes; EOFError where the file ends first (a zero-byte read), never a loop without end."""
    done, need = 0, len(target) if need is None else need
    while done < need:
        got = os.preadv(fd, [target[done:]], offset + done)
        if not got:
            raise EOFError(offset + done)
        done += got


def _let_go(spans: list[tuple[int, int]]) -> None:
    """The pages wholly inside the address ranges `spans` (merged where less than a page apart) handed back to the
    kernel (MADV_PAGEOUT, Linux 5.4 on; elsewhere nothing): their contents stay, and a later read faults them back.
    Read through a file's mapping (a node's tensors at load are views of its node cache copy), they would otherwise
    stay mapped for the run, counted in its resident memory, while the copy's other tensors keep it mapped (0.17 GiB
    for bench/bench_load_memory.py's node; the 70B's 17.3 GiB on disk at `--host-mem 32G`). The kernel skips a
    large folio only partly inside a range: merged ranges leave fewer of those."""
    if _LIBC is None:
        return
    page, merged = mmap.PAGESIZE, []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1] + page:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in merged:
        start, end = -(-start // page) * page, end // page * page
        if end > start:
            _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if sys.platform.startswith("linux") and hasattr(libc, "madvise") else None
    except (OSError, AttributeError):
        return None


MADV_PAGEOUT = 21
_LIBC = _libc()


def _state(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _name(group) -> str:
    return f"layers.{group[0]}-{group[-1]}"
