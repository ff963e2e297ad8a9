"""The disk tier's plan (memory/disk.py): under a host budget the layer groups that do not fit live in the node cache
on disk, the cheapest to read back first; the plan shows them and the bytes read per step, the cost model the
time of those reads."""
import dataclasses
import os

import pytest
import torch
from deferred_copies import DeferredCopies
from frozen_run import run_node
from test_cost import DEVICE, PROFILE
from test_stream import TEXTS, _step, _trainables, _weights

from lowmem_graph import cli
from lowmem_graph.memory import cost
from lowmem_graph.memory.estimate import GroupPlan, group_loads
from lowmem_graph.memory.store import GroupStore
from lowmem_graph.memory.stream import LayerStreamer, _align
from lowmem_graph.nodes import FrozenNode
from lowmem_graph.spec import NodeSpec
from lowmem_graph.memory.report import GiB, format_plan
from lowmem_graph.memory.search import make_plan
from lowmem_graph.spec import load_preset


def test_disk_reads_worked_by_hand():
    # four groups of one layer, 100 B each, streamed through two slots; the top two live on disk (the hand device
    # reads the disk at 1 GB/s: 50 B/s here). The forward loads groups 3 and 4 (1 and 2 stayed in the slots from the
    # backward), the backward groups 1 and 2: of these copies, 3 and 4 are read from disk first, 200 B per
    # micro-batch, 400 B per step of two = 8 s; the copies themselves 400 B x 2 at 1000 B/s = 0.8 s
    groups = [GroupPlan("a", i, i + 1, 100, False, disk=i >= 2) for i in range(4)]
    slow = dataclasses.replace(DEVICE, disk_read=50.0)
    t = cost.step_time(slow, PROFILE, groups, 2, 1, 2, "micro-batch-major", 2)
    assert t.disk_bytes == 400 and t.parts["disk"] == pytest.approx(8.0) and t.parts["copies"] == pytest.approx(0.8)
    without = cost.step_time(slow, PROFILE, [dataclasses.replace(g, disk=False) for g in groups], 2, 1, 2,
                             "micro-batch-major", 2)
    assert t.step == pytest.approx(without.step + 8.0)        # this device overlaps nothing: the reads add
    assert t.bottleneck == "disk reads"
    overlapping = dataclasses.replace(slow, copies_overlap=True)     # hidden with the copies: the slowest wins
    assert cost.step_time(overlapping, PROFILE, groups, 2, 1, 2, "micro-batch-major", 2).step == pytest.approx(8.0)
    # under a layer-major schedule each group is copied (and read) once per step, whatever the micro-batches
    assert cost.step_time(slow, PROFILE, groups, 2, 1, 2, "layer-major", 2).disk_bytes == 200


@pytest.fixture(scope="module")
def paper_70b():
    return load_preset("paper-70b")


def test_a_70b_refiner_on_a_24_gb_card_plans_within_32g_of_host_memory(paper_70b):
    roomy = make_plan(paper_70b, 24 * GiB, host_budget=64 * GiB, device="rtx4090")
    plan = make_plan(paper_70b, 24 * GiB, host_budget=32 * GiB, device="rtx4090")
    assert roomy.host_peak > 32 * GiB >= plan.host_peak
    assert not any(g.disk for g in roomy.groups) and not any(p.disk_bytes for p in roomy.frozen.values())
    # what goes to disk first is what only the frozen pass reads, once per pass: the 70B's lower layers, resident
    # on the card in that pass; the training step reads nothing from disk and takes the time it took
    on_disk = [g for p in plan.frozen.values() for g in p.groups if g.disk]
    assert on_disk and all(g.node == "llama70b" and g.resident for g in on_disk)
    saved = roomy.host_breakdown["frozen_nodes"] - plan.host_breakdown["frozen_nodes"]
    assert saved == sum(g.bytes for g in on_disk)
    assert plan.disk_per_step == 0 and plan.timing.step == roomy.timing.step
    # with less host memory the trained layers, resident on the card at a step, go next (read once per placement),
    # before the frozen pass's streamed ones (read once per micro-batch of it)
    tight = make_plan(paper_70b, 24 * GiB, host_budget=24 * GiB, device="rtx4090")
    assert tight.host_peak <= 24 * GiB and any(g.disk for g in tight.groups)
    streamed = [g for g in tight.frozen["llama70b"].groups if not g.resident]
    assert streamed and not any(g.disk for g in streamed)


def test_streamed_groups_on_disk_are_read_at_every_copy(paper_70b):
    paper = load_preset("paper")
    roomy = make_plan(paper, 2 * GiB, host_budget=64 * GiB, device="rtx4090")
    plan = make_plan(paper, 2 * GiB, host_budget=8 * GiB, device="rtx4090")
    assert roomy.host_peak > 8 * GiB >= plan.host_peak
    streamed_on_disk = [g for g in plan.groups if g.disk and not g.resident]
    assert streamed_on_disk and plan.disk_per_step > 0
    assert plan.host_breakdown["disk_staging"] >= 2 * max(g.bytes for g in streamed_on_disk)
    text = format_plan(plan, paper)
    assert "streamed from disk" in text and f"{plan.disk_per_step / 1e9:.2f} GB read per step" in text
    assert "disk_staging" in text and "in the node cache on disk" in text


def test_the_plan_is_the_fastest_once_its_groups_are_on_disk():
    """At 6 GiB of host memory the fastest placement in host memory (layer-major-host: its kept activations live on
    the host) cannot fit even with every group on disk; another placement can, and is chosen, its reads priced."""
    paper = load_preset("paper")
    roomy = make_plan(paper, 2 * GiB, host_budget=64 * GiB, device="rtx4090")
    plan = make_plan(paper, 2 * GiB, host_budget=6 * GiB, device="rtx4090")
    assert roomy.schedule == "layer-major-host" and plan.schedule != "layer-major-host"
    assert plan.host_peak <= 6 * GiB and plan.disk_per_step > 0
    assert plan.timing.disk_bytes == plan.disk_per_step and plan.timing.step > roomy.timing.step


@pytest.mark.parametrize("host", [64, 12, 8, 6])
def test_runners_up_are_priced_with_their_disk_reads(host):
    """Each runner-up is priced as the chosen plan is, with the reads of what it must put on disk: none is faster
    than the plan, they come fastest first, and where the host is short they read from disk too (at 6 GiB the
    layer-major-host placement that is fastest in host memory fits nowhere, so it is no runner-up)."""
    plan = make_plan(load_preset("paper"), 2 * GiB, host_budget=host * GiB, device="rtx4090")
    steps = [r["timing"].step for r in plan.runners_up]
    assert plan.runners_up and steps == sorted(steps) and steps[0] >= plan.timing.step
    if host == 6:
        assert all(r["timing"].disk_bytes > 0 and "layer-major-host" not in r["kind"] for r in plan.runners_up)
        assert all("disk reads" in r["timing"].why_slower(plan.timing) for r in plan.runners_up)


def test_plan_command_shows_the_70b_plan_under_32g_of_host_memory(capsys):
    assert cli.main(["plan", "--preset", "paper-70b", "--gpu-mem", "24G", "--host-mem", "32G",
                     "--profile", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert "training step" in out and "epoch" in out and "vs 32,768 MiB available" in out
    assert "(layers 0-" in out      # the frozen pass table names the layers on disk
    assert "GB of resident groups from disk" in out     # read once per pass: priced in the first epoch


# --- the streamer's disk source, and a run under a plan with groups on disk -------------------------------------

@pytest.fixture
def node():
    """A node of its own: a store rebinds its layers to views of the file."""
    return FrozenNode.load(NodeSpec(name="m", model="tiny:mistral", role="refiner"), "nf4", "cpu", 64)


def test_groups_streamed_from_disk_give_the_plain_numbers(node, tmp_path):
    trainables = _trainables(node)
    plain = _step(node, *trainables)
    enc = node.encode(TEXTS)
    with torch.no_grad():
        plain_eval = run_node(node, enc["input_ids"], enc["attention_mask"])
    before = {k: v.clone() for k, v in node.frozen_tensors()}
    store = GroupStore(tmp_path, node.identity, node.layers, [[1], [2], [3]])
    file = store.views[(1,)].untyped_storage().data_ptr()
    assert all(store.views[(1,)].untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
               for t in _weights(node.layers[1]))       # at rest: views of the file's pages, not host copies
    with LayerStreamer(node.layers, [[0], [1], [2], [3]], {0, 3}, device="cpu",
                       disk={1: store, 2: store, 3: store}) as streamer:
        assert streamer.slab.numel() == 2 * _align(streamer.slot_bytes)   # only the two staging buffers
        for step in range(2):
            reads = streamer.disk_reads
            for a, b in zip(plain, _step(node, *trainables)):
                assert torch.equal(a, b)
            if step:    # steady state: every copy of a group on disk reads it once, as the plan predicts
                predicted = group_loads([GroupPlan("m", i, i + 1, 1, False, disk=True) for i in (1, 2)], 2,
                                        disk=True)
                assert streamer.disk_reads - reads == len(predicted[0]) + len(predicted[1])
        with torch.no_grad():
            assert torch.equal(run_node(node, enc["input_ids"], enc["attention_mask"]), plain_eval)
    assert streamer.disk_bytes > 0 and streamer.misses == 1
    for k, v in node.frozen_tensors():
        assert torch.equal(v, before[k]), k
    assert node.layers[3].mlp.down_proj.weight.untyped_storage().data_ptr() == file    # back to the file, resident too
    for a, b in zip(plain, _step(node, *trainables)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("resident", [(), (0,), (0, 3)])
def test_groups_on_disk_hold_no_device_bytes_until_copied(node, tmp_path, slots, resident):
    """A streamed group at rest on its store's pages is not device memory: the streamer holds its resident groups
    (on disk or not) and its slots, nothing more, at rest and at its peak over steps and an evaluation."""
    trainables = _trainables(node)
    enc = node.encode(TEXTS)
    store = GroupStore(tmp_path, node.identity, node.layers, [[1], [2], [3]])
    with LayerStreamer(node.layers, [[0], [1], [2], [3]], resident, device="cpu", slots=slots,
                       disk={1: store, 2: store, 3: store}) as streamer:
        assert streamer.held_bytes() == streamer.resident_bytes
        _step(node, *trainables)
        with torch.no_grad():
            run_node(node, enc["input_ids"], enc["attention_mask"])
        assert streamer.peak_device_bytes == streamer.device_bytes \
            == streamer.resident_bytes + slots * streamer.slot_bytes


def test_one_slot_reads_each_group_ahead_of_its_copy(node, tmp_path):
    trainables = _trainables(node)
    plain = _step(node, *trainables)
    store = GroupStore(tmp_path, node.identity, node.layers, [[0], [1], [2], [3]])
    with LayerStreamer(node.layers, [[0], [1], [2], [3]], device="cpu", slots=1,
                       disk={g: store for g in range(4)}) as streamer:
        for _ in range(2):
            for a, b in zip(plain, _step(node, *trainables)):
                assert torch.equal(a, b)
    assert streamer.disk_reads == streamer.loads == 4 + 3 + 3 + 3


def test_a_killed_write_leaves_no_store_and_a_damaged_one_is_written_again(node, tmp_path, monkeypatch, capsys):
    real = GroupStore._save

    def killed(self, *args):
        real(self, *args)
        raise KeyboardInterrupt     # killed after the bytes, before the rename

    monkeypatch.setattr(GroupStore, "_save", killed)
    with pytest.raises(KeyboardInterrupt):
        GroupStore(tmp_path, node.identity, node.layers, [[1], [2]])
    assert list(tmp_path.iterdir()) == []       # not even the temporary
    monkeypatch.setattr(GroupStore, "_save", real)
    store = GroupStore(tmp_path, node.identity, node.layers, [[1], [2]])
    path = store.path
    store.close()
    with open(path, "r+b") as f:        # one byte of group 2 flipped
        f.seek(store.span[(2,)][0] + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = GroupStore(tmp_path, node.identity, node.layers, [[1], [2]])
    assert "damaged" in capsys.readouterr().err and again.path == path
    buffer = torch.empty(again.span[(2,)][1], dtype=torch.uint8)
    again.read_into((2,), buffer)
    assert torch.equal(buffer, again.views[(2,)])


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not os.path.exists("/proc/self/io"),
                    reason="needs posix_fadvise and /proc/self/io (Linux)")
def test_a_group_read_from_the_store_leaves_its_pages_droppable(node, tmp_path):
    """The reader thread's reads map nothing of the file: after a read, dropping the file from the page cache works
    and the next read comes from the disk again (a page a copy from the mapping faulted in stays mapped, and
    posix_fadvise DONTNEED leaves it resident)."""
    store = GroupStore(tmp_path, node.identity, node.layers, [[1], [2]])
    start, n = store.span[(1,)]
    buffer = torch.empty(n, dtype=torch.uint8)

    def fetched(read) -> int:
        """Bytes fetched from the block device by `read` right after the file is dropped from the page cache."""
        os.posix_fadvise(store._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        before = _read_bytes()
        read()
        return _read_bytes() - before

    if fetched(lambda: os.pread(store._fd, n, start)) < n:
        pytest.skip("this filesystem keeps the file in memory (tmpfs?): a drop reads nothing from a disk")
    for _ in range(2):      # the second read: the first left every page droppable
        assert fetched(lambda: store.read_into((1,), buffer)) >= n
    assert torch.equal(buffer, store.views[(1,)])


def _disk_plan(plan):
    """The forced plan (tests/test_memory_plan_training.py) with the refiners' streamed groups and the readers'
    streamed frozen-pass layers on disk."""
    groups = [dataclasses.replace(g, disk=not g.resident) for g in plan.groups]
    frozen = {n: dataclasses.replace(p, groups=[dataclasses.replace(g, disk=not g.resident) for g in p.groups])
              for n, p in plan.frozen.items()}
    return dataclasses.replace(plan, groups=groups, frozen=frozen)


def test_a_run_with_groups_on_disk_trains_bit_for_bit_like_the_host_plan(tmp_path, monkeypatch, streamers_made):
    import json

    from test_memory_plan_training import SPEC, _forced_plan

    from lowmem_graph.memory import search as planning
    from lowmem_graph.train import TrainConfig, train

    made = streamers_made
    base = {**SPEC.train, "limit_train": 8, "limit_eval": 4, "epochs": 1, "lr": 3e-3, "gpu_mem": "1G"}
    losses = {}
    for name, plan in (("host", _forced_plan()), ("disk", _disk_plan(_forced_plan()))):
        monkeypatch.setattr(planning, "make_plan", lambda *a, plan=plan, **k: plan)
        train(SPEC, TrainConfig.from_dict({**base, "cache_dir": str(tmp_path / f"cache-{name}")}), tmp_path / name,
              progress=False, log=lambda *_: None)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"]
        if name == "disk":
            assert made and all(s.disk_reads > 0 for s in made if s.order)     # every streamer read from disk
        made.clear()
    assert losses["disk"] == losses["host"]


def test_under_a_host_budget_below_its_layers_a_run_trains_bit_for_bit_like_the_plain_one(tmp_path, short_run):
    """No forced plan: --host-mem leaves less host memory than the tiny graph's layers need beside the fixed
    allowances, so the planner puts groups on disk, and the run reads them from there (the plain run: conftest's)."""
    import json

    from lowmem_graph.memory.budget import parse_size

    spec = load_preset("tiny")
    roomy = make_plan(spec, parse_size("1G"), 8, spec.max_length, 64 * GiB, main="cpu")
    layers = sum(g.bytes for g in roomy.groups) + sum(p.resident_bytes for p in roomy.frozen.values())
    host = roomy.host_peak - layers // 2
    planned = make_plan(spec, parse_size("1G"), 8, spec.max_length, host, main="cpu")
    assert planned.host_peak <= host < roomy.host_peak
    assert any(p.disk_bytes for p in planned.frozen.values())
    run = tmp_path / "disk"
    assert cli.main(["train", "--run-dir", str(run), "--epochs", "1", "--limit-train", "16", "--limit-eval", "8",
                     "--no-progress", "--gpu-mem", "1G", "--host-mem", str(host), "--device", "cpu",
                     "--cache-dir", str(tmp_path / "prefix")]) == 0
    losses = [[r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "step"] for folder in (run, short_run)]
    assert losses[0] == losses[1]
    from lowmem_graph.tiny import cache_root

    stored = list((cache_root() / "nodes" / "disk").glob("groups-*.safetensors"))
    assert stored and not list((cache_root() / "nodes" / "disk").glob(".*.tmp"))     # whole files, no temporaries


def test_the_disk_bench_reads_every_group_back_each_way(tmp_path):
    bench = _bench("bench_disk")
    assert bench.main(["--group-mib", "1", "--groups", "2", "--rounds", "1", "--dir", str(tmp_path / "store"),
                       "--out", str(tmp_path / "out")]) == 0      # it checks the bytes each way reads
    table = (tmp_path / "out" / "disk-cpu.md").read_text()
    methods = ("pread", "mmap", "safe_open") + (() if "O_DIRECT: refused" in table else ("O_DIRECT",))
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")[-2].strip()
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert all((m, c) in rows for m in methods for c in ("cold", "warm"))
    if "at most 0.0% of it was still resident" in table:       # the drops worked: each cold read read the disk
        assert all(float(rows[m, "cold"]) >= 0.99 for m in methods)
        assert float(rows["pread", "warm"]) == 0.0


def _bench(name: str):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not os.path.exists("/proc/self/io"),
                    reason="needs posix_fadvise and /proc/self/io (Linux)")
def test_calibrate_times_disk_reads_that_read_the_disk(tmp_path, monkeypatch, capsys):
    """The profile's disk_read is the cold figure: each timed read fetched the whole file from the block device;
    where the reads came from the page cache instead, calibrate says so."""
    calibrate, nbytes = _bench("calibrate"), 8 << 20
    before = _read_bytes()
    calibrate.disk_rate(tmp_path, nbytes)
    if "from the page cache" in capsys.readouterr().err:
        pytest.skip("this filesystem keeps the file in memory (tmpfs?)")
    assert _read_bytes() - before >= 3 * nbytes
    monkeypatch.setattr(calibrate, "_read_bytes", lambda: 0)      # as on tmpfs: nothing from a device
    calibrate.disk_rate(tmp_path, nbytes)
    assert "disk_read is the page cache's rate" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_groups_on_disk_stream_like_resident_ones(tmp_path):
    """The CUDA path: staging buffers page-locked with the slab, the reader waiting for the copy out of its buffer,
    a resident group on disk moved to the device from the file's pages and back to them, not to a host copy."""
    spec = NodeSpec(name="m", model="tiny:mistral", role="refiner")
    resident = FrozenNode.load(spec, "nf4", "cuda", 64)
    hosted = FrozenNode.load(spec, "nf4", "cpu", 64, compute_device="cuda")
    store = GroupStore(tmp_path, hosted.identity, hosted.layers, [[0], [1], [2], [3]])
    trainables = _trainables(resident, device="cuda")
    plain = _step(resident, *trainables)
    for part in (hosted.base.norm, hosted.base.rotary_emb):
        part.to("cuda")
    hosted.device = torch.device("cuda")
    with LayerStreamer(hosted.layers, [[0], [1], [2], [3]], {3}, device="cuda",
                       disk={g: store for g in range(4)}) as streamer:
        assert streamer.slab.is_pinned()
        for _ in range(3):
            for a, b in zip(plain, _step(hosted, *trainables)):
                torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-3 * a.abs().max().item())
        assert streamer.disk_reads > 0
    file = store.views[(3,)].untyped_storage().data_ptr()
    assert hosted.layers[3].mlp.down_proj.weight.untyped_storage().data_ptr() == file


@pytest.mark.parametrize("wait", [True, False])
def test_copies_out_of_staging_land_before_the_reader_refills_it(node, tmp_path, monkeypatch, wait):
    """The CUDA ordering on the CPU (tests/deferred_copies.py, each copy reading its source when it lands): the
    reader waits for the copy out of its staging buffer before it reads the next group into it; without that wait
    a copy lands with the next group's bytes. The reads run as they are asked for (no thread), so the order of
    reads and landings is the same at every run."""
    from concurrent.futures import Future

    class Inline:
        def submit(self, fn):
            done = Future()
            done.set_result(fn())
            return done

        def shutdown(self, wait=True):
            pass

    trainables = _trainables(node)
    plain = _step(node, *trainables)
    store = GroupStore(tmp_path, node.identity, node.layers, [[0], [1], [2], [3]])
    streamer = DeferredCopies(late_source=True).install(monkeypatch)
    if not wait:
        monkeypatch.setattr(type(torch.cuda.Event()), "synchronize", lambda self: None)
    with streamer(node.layers, [[0], [1], [2], [3]], {3}, device="cpu", disk={g: store for g in range(3)}) as s:
        s._reader.shutdown()
        s._reader = Inline()
        same = [all(torch.equal(a, b) for a, b in zip(plain, _step(node, *trainables))) for _ in range(3)]
        assert s.disk_reads > 0
    assert all(same) if wait else not all(same)
