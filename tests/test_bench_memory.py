"""The GPU memory benchmark's code path, run on the CPU with the tiny preset (it measures nothing here)."""
import csv
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_memory  # noqa: E402


def test_smoke_run_writes_rows_for_every_configuration(tmp_path):
    rows = bench_memory.run(["1G"], batch=4, seq=32, steps=1, out_dir=tmp_path, smoke=True)
    nodes = ["llama", "qwen2", "gemma2", "phi3", "mistral"]
    assert [r["config"] for r in rows] == ["all resident", *(f"frozen pass {n}" for n in nodes), "plan 1G",
                                           "every group streamed", "accelerate cpu_offload (bf16 layers)"]
    by = {r["config"]: r for r in rows}
    assert by["every group streamed"]["streamed_mib_per_step"] > 0 and by["all resident"]["streamed_mib_per_step"] == 0
    # forced placements carry their own predictions, not the budget plan's
    assert by["every group streamed"]["predicted_peak_mib"] != by["plan 1G"]["predicted_peak_mib"]
    offload = by["accelerate cpu_offload (bf16 layers)"]
    assert "error" not in offload and offload["step_ms"] > 0 and offload["offloaded_mib"] > 0
    assert all(r["batch_ms"] > 0 and r["micro_batch"] == 4 for r in rows[1:6])
    with open(tmp_path / "memory-cpu-smoke.csv") as f:
        assert len(list(csv.DictReader(f))) == 9
    assert (tmp_path / "memory-cpu-smoke.png").read_bytes()[:4] == b"\x89PNG"


def test_a_card_too_small_for_a_measurement_gets_a_row_saying_so_and_the_rest_run(tmp_path, monkeypatch):
    """A 12 GB card cannot hold the all-resident reference: that row and any other out-of-memory one say so."""
    def measure(label, graph, plan, *args):
        if label in ("all resident", "plan 1G"):
            raise bench_memory.torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return {"config": label, "predicted_peak_mib": 1.0, "step_ms": 5.0}

    monkeypatch.setattr(bench_memory, "build_graph", lambda spec, device: None)
    monkeypatch.setattr(bench_memory, "random_inputs", lambda *args: None)
    monkeypatch.setattr(bench_memory, "measure", measure)
    monkeypatch.setattr(bench_memory, "measure_frozen", lambda budget, *args: [{"config": f"frozen {budget}"}])
    monkeypatch.setattr(bench_memory, "accelerate_offload_row", lambda *args: {"config": "offload", "step_ms": 9.0})
    rows = bench_memory.run(["1G", "2G"], batch=4, seq=32, steps=1, out_dir=tmp_path, smoke=True)
    assert [r["config"] for r in rows] == ["all resident", "frozen 1G", "plan 1G", "frozen 2G", "plan 2G",
                                           "every group streamed", "offload"]
    failed = [r for r in rows if "error" in r]
    assert [r["config"] for r in failed] == ["all resident", "plan 1G"]
    assert all(r["error"] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB" for r in failed)
    assert failed[1]["budget_gib"] == 1.0 and failed[1]["predicted_peak_mib"] > 0
    assert not any("step_vs_all_resident" in r for r in rows)      # no reference to compare with


def test_what_other_programs_hold_is_read_from_nvml_for_one_gpu(monkeypatch):
    """NVML's used bytes before this process's context: one GPU only, None where NVML is missing or refuses."""
    from lowmem_graph.memory import report

    class FakeNVML:
        def __init__(self, gpus, used, init=0):
            self.gpus, self.used, self.init, self.shut = gpus, used, init, False

        def nvmlInit_v2(self):
            return self.init

        def nvmlDeviceGetCount_v2(self, count):
            count._obj.value = self.gpus
            return 0

        def nvmlDeviceGetHandleByIndex_v2(self, index, handle):
            handle._obj.value = 1234
            return 0

        def nvmlDeviceGetMemoryInfo(self, handle, memory):
            memory[:] = [24 << 30, (24 << 30) - self.used, self.used]
            return 0

        def nvmlShutdown(self):
            self.shut = True

    assert report.others_on_the_gpu() is None               # no NVML on this machine
    for gpus, init, want in ((1, 0, 812 << 20), (2, 0, None), (1, 9, None)):
        nvml = FakeNVML(gpus, 812 << 20, init)
        monkeypatch.setattr(report.ctypes, "CDLL", lambda name: nvml)
        assert report.others_on_the_gpu() == want and nvml.shut == (init == 0)


def test_random_nodes_are_4bit_real_architectures():
    from lowmem_graph.spec import load_preset

    spec = load_preset("tiny")
    node = bench_memory.random_nf4_node(spec.nodes[3], 64, bench_memory.torch.device("cpu"), 0)
    assert node.width == 96 and any(isinstance(m, bnb.nn.Linear4bit) for m in node.model.modules())
    assert not any(p.is_meta for p in node.model.parameters())


@pytest.mark.skipif(bench_memory.torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_nothing_is_measured(tmp_path, capsys):
    assert bench_memory.main(["--out", str(tmp_path / "r")]) == 3
    assert "nothing measured" in capsys.readouterr().out and not (tmp_path / "r").exists()
