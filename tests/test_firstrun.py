"""A plan's first run (memory/firstrun.py): the download and the NF4 quantisation of nodes not yet in the node cache,
priced once; and the quantisation rate a device profile carries for it (memory/devices.py)."""
import json

import pytest
import torch

from lowmem_graph.memory import devices, firstrun
from lowmem_graph.memory.firstrun import Pending
from lowmem_graph.spec import NodeSpec, load_preset

# round figures: disk 1 GB/s, 2 G weights/s quantised
DEVICE = devices.DeviceProfile("hand", 1000.0, 500.0, {"bf16": 1e6, "fp32": 5e5}, 1440.0, 0.01, 1e9, 1e4,
                               nf4_quantise=2e9)


def test_a_first_run_worked_by_hand():
    # a: 100 MB to download at the assumed 50 MB/s -> 2 s; reading 2 GB + 1 GB at 1 GB/s -> 3 s;
    # quantising 1 G + 3 G weights at 2 G/s -> 2 s; 7 s in all
    todo = [Pending("a", 100_000_000, 2_000_000_000, 1_000_000_000), Pending("b", 0, 1_000_000_000, 3_000_000_000)]
    assert firstrun.DOWNLOAD_BYTES_PER_S == 50e6
    t = firstrun.seconds(DEVICE, todo)
    assert t == pytest.approx({"download": 2.0, "read": 3.0, "quantise": 2.0})


def test_the_line_plan_prints(monkeypatch):
    todo = [Pending("a", 100_000_000, 2_000_000_000, 1_000_000_000), Pending("b", 0, 1_000_000_000, 3_000_000_000)]
    monkeypatch.setattr(firstrun, "pending", lambda spec, compute: todo)
    line, = firstrun.format_first_run(None, DEVICE, torch.bfloat16)
    assert line.startswith("first run (once, then cached): + 7,000 ms for a, b, not yet in the node cache: "
                           "download 0.10 GB 2,000 ms (at an assumed 50 MB/s)")
    assert "reading 3.00 GB 3,000 ms, NF4 quantisation of 4.00 G weights 2,000 ms" in line
    unknown = devices.DeviceProfile("old", 1000.0, 500.0, {"fp32": 5e5}, 1440.0, 0.01, 1e9, 1e4)   # no rate
    assert firstrun.seconds(unknown, todo)["quantise"] is None
    assert "(no rate in this profile: bench/calibrate.py measures one)" in firstrun.format_first_run(
        None, unknown, torch.bfloat16)[0]
    local = [Pending("a", 0, 2_000_000_000, 1_000_000_000)]        # nothing to download: not said; minutes
    monkeypatch.setattr(firstrun, "pending", lambda spec, compute: local)
    slow = devices.DeviceProfile("cpu", 1e9, 1e9, {"fp32": 1e11}, 1e9, 1e-4, 1e7, 1e10, nf4_quantise=1e7)
    assert firstrun.format_first_run(None, slow, torch.float32) == [
        "first run (once, then cached): + 5 min for a, not yet in the node cache: reading 2.00 GB 3 min, NF4 "
        "quantisation of 1.00 G weights 100.0 s"]
    monkeypatch.setattr(firstrun, "pending", lambda spec, compute: [])
    assert firstrun.format_first_run(None, DEVICE, torch.bfloat16) == []


def test_a_hub_node_not_downloaded_counts_its_download_and_quantisation():
    """The paper preset offline: nothing of it is in the hub cache here, so every node downloads its checkpoint
    (bf16: 2 bytes a parameter, from the shipped config) and quantises its decoder layers' linears."""
    spec = load_preset("paper")
    todo = {p.node: p for p in firstrun.pending(spec, torch.bfloat16)}
    assert set(todo) == {n.name for n in spec.nodes}
    mistral = todo["mistral"]
    assert mistral.download == mistral.read == pytest.approx(2 * 7.24e9, rel=0.01)
    # 32 layers x (q 4096^2 + k, v 4096 x 1024 + o 4096^2 + 3 x 4096 x 14336)
    assert mistral.weights == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)


def test_a_node_in_the_node_cache_costs_nothing_the_first_time(tmp_path, monkeypatch):
    """Local models download nothing and read their own files; once FrozenNode.load has quantised a node for a
    compute dtype, that node is no longer pending for it (another dtype is another copy)."""
    from lowmem_graph.nodes import FrozenNode
    from lowmem_graph.tiny import tiny_path

    monkeypatch.setenv("LOWMEM_GRAPH_CACHE", str(tmp_path))
    node = NodeSpec(name="q", model="tiny:qwen2", role="reader")
    before = firstrun.node_pending(node, torch.float32)       # not built yet: sizes from the config
    assert before.download == 0 and before.read > 0 and before.weights == 4 * (2 * 48 * 48 + 2 * 48 * 24
                                                                                + 3 * 48 * 96)
    folder = tiny_path("qwen2")
    built = firstrun.node_pending(node, torch.float32)
    assert built.read == (folder / "model.safetensors").stat().st_size and built.weights == before.weights
    FrozenNode.load(node, "nf4", "cpu", 64)
    assert firstrun.node_pending(node, torch.float32) is None
    assert firstrun.node_pending(node, torch.bfloat16) == built


def test_built_in_profiles_quantise_at_the_pageable_link_rate(tmp_path):
    """A GPU's first-run rate: a bf16 weight over PCIe (pageable) and its NF4 back, 2.5 bytes a weight; a profile
    measured before the field existed still loads (no rate: the line says so)."""
    for name, profile in devices.BUILT_IN.items():
        if name != "cpu":
            assert profile.nf4_quantise == pytest.approx(profile.h2d_pageable / 2.5)
    assert 0 < devices.BUILT_IN["cpu"].nf4_quantise < 574e6 / 19.7      # bench/results/quantise-cpu.md's first run
    assert devices.BUILT_IN["rtx4090"].nf4_quantise == pytest.approx(31.5e9 * 0.4 / 2.5)
    old = devices.BUILT_IN["rtx4090"].to_dict()
    del old["nf4_quantise"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert devices.load(tmp_path / "old.json").nf4_quantise == 0.0


def test_plan_prints_the_first_run(capsys):
    from lowmem_graph import cli

    assert cli.main(["plan", "--preset", "paper", "--gpu-mem", "6G", "--host-mem", "64G", "--profile", "rtx4090"]) == 0
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert last.startswith("first run (once, then cached): + ") and "llama, qwen, gemma, phi3, mistral" in last


def test_a_checkpoint_quantised_already_has_no_first_run(tmp_path, monkeypatch):
    """A bnb or GPTQ checkpoint is loaded as it is (FrozenNode.load quantises and caches nothing): no first-run line,
    on every run."""
    from lowmem_graph import loading

    monkeypatch.setenv("LOWMEM_GRAPH_CACHE", str(tmp_path))       # a node cache without this node's copy
    node = NodeSpec(name="q", model="tiny:qwen2", role="reader")
    config, model = loading.meta_model(node.model)
    assert firstrun.node_pending(node, torch.float32) is not None
    config.quantization_config = {"quant_method": "gptq", "bits": 4}
    monkeypatch.setattr(loading, "meta_model", lambda *a, **k: (config, model))
    assert firstrun.node_pending(node, torch.float32) is None
