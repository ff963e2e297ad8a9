"""The disk tier's store (memory/store.py): every group's view aligned whatever its size, still a safetensors file;
hashed once as it is written, then trusted by its stamp, and any change to it caught when it is opened."""
import pytest
import torch

from lowmem_graph.memory.store import GroupStore


def _layers(sizes, seed=0):
    """Layers of one uint8 buffer and one fp32 parameter each, of the given byte counts: groups of every size."""
    generator = torch.Generator().manual_seed(seed)
    layers = torch.nn.ModuleList(torch.nn.Module() for _ in sizes)
    for layer, n in zip(layers, sizes):
        layer.register_buffer("packed", torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator))
        layer.weight = torch.nn.Parameter(torch.randn(n % 7 + 1, generator=generator), requires_grad=False)
    return layers


SIZES = [1, 2, 3, 7, 8, 63, 64, 100, 255, 256, 257, 300, 511, 512, 513, 1000, 4095, 4096, 4097, 12345]


def test_every_group_of_a_store_is_aligned_whatever_its_size(tmp_path):
    from safetensors import safe_open

    from lowmem_graph.memory.store import ALIGN

    layers = _layers(SIZES)
    before = [(layer.packed.clone(), layer.weight.clone()) for layer in layers]
    groups = [[0], [1, 2], [3, 4, 5]] + [[i] for i in range(6, 12)] + [[12, 13], [14, 15, 16], [17], [18, 19]]
    store = GroupStore(tmp_path, "aligned", layers, groups)
    assert store._data % ALIGN == 0
    with safe_open(str(store.path), "pt") as f:        # still a safetensors file, each group in one tensor
        for g in store.groups:
            start, n = store.span[g]
            assert start % ALIGN == 0 and store.views[g].data_ptr() % ALIGN == 0
            assert torch.equal(f.get_tensor(f"layers.{g[0]}-{g[-1]}")[:n], store.views[g])
    for layer, (packed, weight) in zip(layers, before):
        assert layer.packed.data_ptr() % ALIGN == 0 and layer.weight.data_ptr() % ALIGN == 0
        assert torch.equal(layer.packed, packed) and torch.equal(layer.weight, weight)


@pytest.mark.parametrize("damage", ["flip", "flip, mtime set back", "cut short", "another store's file"])
def test_a_store_is_hashed_once_written_and_any_change_is_caught(tmp_path, capsys, damage):
    import os

    groups = [[0, 1], [2], [3, 4, 5]]
    store = GroupStore(tmp_path, "k", _layers(SIZES[:6]), groups)
    assert store.hashed == len(groups)                          # as it is written
    again = GroupStore(tmp_path, "k", _layers(SIZES[:6]), groups)
    assert again.hashed == 0 and "damaged" not in capsys.readouterr().err     # its stamp vouches for it
    assert GroupStore(tmp_path, "k", _layers(SIZES[:6]), groups, verify=True).hashed == len(groups)
    path, st = store.path, os.stat(store.path)
    if damage == "another store's file":
        other = GroupStore(tmp_path, "other", _layers(SIZES[:6], seed=1), groups)
        os.replace(other.path, path)
    elif damage == "cut short":
        os.truncate(path, st.st_size - 1)
    else:
        with open(path, "r+b") as f:        # one byte of the last group flipped, right after the check
            f.seek(store.span[(3, 4, 5)][0] + 3)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        if damage == "flip, mtime set back":
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    fresh = _layers(SIZES[:6])
    want = [t.clone() for layer in fresh for t in (layer.packed, layer.weight)]
    rewritten = GroupStore(tmp_path, "k", fresh, groups)
    assert "damaged" in capsys.readouterr().err and rewritten.hashed >= len(groups)
    assert all(torch.equal(a, b) for a, b in zip(want, [t for layer in fresh for t in (layer.packed, layer.weight)]))


def _anon() -> int:
    """This process's anonymous resident memory (RssAnon), in bytes: what torch storages take, which tracemalloc
    does not see."""
    from pathlib import Path

    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["RssAnon"].split()[0]) * 1024


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads /proc/self/status")
@pytest.mark.parametrize("layout", ["two tensors a group", "aliases and odd sizes"])
def test_writing_a_store_never_holds_a_group_in_anonymous_memory(tmp_path, layout):
    """A group bound for disk goes from its tensors (at load, views of the node cache's pages) into the file as it
    is: the writer packs no group in memory (glibc keeps freed chunks of tens of MB in its heap, so packed groups
    pile up), and the run holds no more anonymous memory while writing than a fraction of one group."""
    import threading

    mib = 2 ** 20
    if layout == "two tensors a group":
        sizes, groups = [16 * mib] * 6, [[0, 1], [2, 3], [4, 5]]
    else:
        sizes, groups = [16 * mib + 1, 8 * mib - 3, 16 * mib + 255, 12 * mib], [[0], [1, 2], [3]]
    layers = _layers(sizes)
    if layout != "two tensors a group":
        layers[1].register_buffer("alias", layers[1].packed)      # one tensor under two names: written once
    want = [torch.clone(layer.packed) for layer in layers]
    done, peak = threading.Event(), [0]

    def sample():
        while not done.wait(0.001):
            peak[0] = max(peak[0], _anon())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    base = _anon()
    store = GroupStore(tmp_path, "anon", layers, groups)
    done.set()
    sampler.join()
    assert peak[0] - base < min(store.span[tuple(g)][1] for g in groups) / 4
    assert all(torch.equal(layer.packed, w) for layer, w in zip(layers, want))
    reread = GroupStore(tmp_path, "anon", _layers(sizes), groups, verify=True)       # its digests are the bytes'
    assert reread.hashed == len(groups)


def _pages_out() -> bool:
    """Whether this kernel takes MADV_PAGEOUT (Linux 5.4 on)."""
    import ctypes
    import mmap

    from lowmem_graph.memory import store

    if store._LIBC is None:
        return False
    area = mmap.mmap(-1, mmap.PAGESIZE)
    at = ctypes.addressof(ctypes.c_char.from_buffer(area))
    return store._LIBC.madvise(ctypes.c_void_p(at), ctypes.c_size_t(mmap.PAGESIZE), store.MADV_PAGEOUT) == 0


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status") or not _pages_out(),
                    reason="reads /proc/self/status; needs MADV_PAGEOUT")
def test_the_node_cache_pages_a_store_is_written_from_are_let_go(tmp_path):
    """At load a node's tensors are views of its node cache copy's pages; writing the store reads the groups bound
    for disk through them. Those pages are then given back (they would stay mapped, file-backed, for the run: the
    node's other tensors keep the copy mapped), so the run's resident memory is what the plan says."""
    import mmap
    from pathlib import Path

    def file_backed() -> int:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["RssFile"].split()[0]) * 1024

    mib, generator = 2 ** 20, torch.Generator().manual_seed(0)
    sizes, groups = [16 * mib, 8 * mib + 5, 16 * mib - 3, 4 * mib, 12 * mib], [[0, 1], [2, 3], [4]]
    copy = tmp_path / "copy.bin"
    copy.write_bytes(torch.randint(0, 256, (sum(sizes) + 1000,), dtype=torch.uint8, generator=generator).numpy())
    with open(copy, "rb") as f:
        pages = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    layers, at = torch.nn.ModuleList(torch.nn.Module() for _ in sizes), 1000
    for layer, n in zip(layers, sizes):
        layer.register_buffer("packed", pages[at: at + n])
        at += n
    base = file_backed()
    store = GroupStore(tmp_path / "store", "pages", layers, groups)
    assert file_backed() - base < 4 * mib
    assert torch.equal(torch.cat([layer.packed for layer in layers]), pages[1000:])    # the bytes, all of them
    assert store.hashed == len(groups)


def test_pread_into_fills_what_is_there_and_stops_at_the_end_of_the_file(tmp_path):
    """Every length and offset around a short file: the bytes where the file has them, EOFError where it ends first
    (a zero-byte read), never a loop without end (calibrate's reads once had one)."""
    import os

    from lowmem_graph.memory.store import pread_into

    data = bytes(range(10))
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(12):
            for need in range(13):
                target = bytearray(need)
                if offset + need <= len(data) or need == 0:     # nothing asked, nothing read
                    pread_into(fd, memoryview(target), offset)
                    assert bytes(target) == data[offset:offset + need]
                else:
                    with pytest.raises(EOFError):
                        pread_into(fd, memoryview(target), offset)
    finally:
        os.close(fd)
