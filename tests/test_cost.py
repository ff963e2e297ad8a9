"""The planner's cost model (memory/cost.py) and device profiles (memory/devices.py): the arithmetic on a case worked
by hand, profiles built in, measured and found, and `plan` printing the predicted times."""
import dataclasses

import re

import pytest

from lowmem_graph import cli
from lowmem_graph.errors import UserError
from lowmem_graph.memory import cost, devices
from lowmem_graph.memory.estimate import GroupPlan, group_loads, traffic
from lowmem_graph.memory.profile import _Node, _Profile
from lowmem_graph.memory.report import format_plan
from lowmem_graph.memory.search import make_plan
from lowmem_graph.spec import load_preset

# One refiner: width 4, MLP 8, q 4, kv 2 -> linear weights 2*4*4 + 2*4*2 + 3*4*8 = 144 per layer, NF4.
NODE = _Node("a", "refiner", 4, 8, 2, 1, False, 4, [100] * 4, [32] * 4, 0, 0, 0, q_dim=4, quant="nf4",
             linear_params=144)
PROFILE = _Profile({"a": NODE}, trainable=10, latent=4, reader_widths=[])
# A made-up device with round figures: 1 MFLOP/s, 1440 weights/s dequantised (0.1 s per layer run), 10 ms per
# layer run, 1000 B/s copies, 10 kB/s memory.
DEVICE = devices.DeviceProfile("hand", 1000.0, 500.0, {"bf16": 1e6, "fp32": 5e5}, 1440.0, 0.01, 1e9, 1e4,
                               copies_overlap=False)
# two groups of two layers, both streamed and checkpointed, 200 and 300 bytes
GROUPS = [GroupPlan("a", 0, 2, 200, False), GroupPlan("a", 2, 4, 300, False)]


def test_a_step_worked_by_hand():
    # micro-batch 1 of 2 tokens (seq 2), batch 2: two micro-batches
    # forward of a layer: 2 * 144 * 2 = 576 FLOPs of linears + 4 * 2 * 2 * 4 = 64 of attention = 640 -> 640 us;
    # backward (input gradients only): 576 + 2 * 64 = 704 -> 704 us. Checkpointed: forward twice, backward once.
    # gemm: 4 layers x 2 micro-batches x (2 * 640 + 704) us = 15,872 us, of it recompute 4 x 2 x 640 = 5,120 us
    # dequant: 4 x 2 x 3 runs x 0.1 s = 2.4 s; launch: 4 x 2 x (2 forwards + backward's 2) x 10 ms = 0.32 s
    # head: 6 FLOPs x 10 params x 4 tokens = 240 us; AdamW 28 B x 10 / 10 kB/s = 28 ms; fixed costs: 1 node x 10 ms
    # x (8 per micro-batch x 2 + 2 per step) = 180 ms
    # copies, one slot: forward loads group 2 (group 1 stayed from the backward), backward group 1 (group 2 stayed):
    # 500 B per micro-batch, 1000 B per step = 1 s, not overlapped on this device
    t = cost.step_time(DEVICE, PROFILE, GROUPS, 1, 1, 2, "micro-batch-major", 2)
    assert t.parts == pytest.approx({"gemm": 0.015872, "recompute": 0.00512, "dequant": 2.4, "launch": 0.32,
                                     "head+optimizer": 0.00024 + 0.028 + 0.18, "copies": 1.0,
                                     "disk": 0.0})
    assert t.copied_bytes == 1000 and not t.overlapped
    assert t.step == pytest.approx(0.015872 + 2.4 + 0.32 + 0.20824 + 1.0)
    assert t.bottleneck == "NF4 dequantisation"
    # what our hooks and the checkpoint add, per checkpointed layer and micro-batch: 4 x 2 x 5 ms more launch overhead
    hooked = cost.step_time(dataclasses.replace(DEVICE, hooks=0.005), PROFILE, GROUPS, 1, 1, 2, "micro-batch-major", 2)
    assert hooked.parts["launch"] == pytest.approx(0.32 + 0.04) and hooked.step == pytest.approx(t.step + 0.04)
    kept = [dataclasses.replace(g, checkpointed=False, resident=True) for g in GROUPS]
    assert cost.step_time(dataclasses.replace(DEVICE, hooks=0.005), PROFILE, kept, 0, 1, 2, "micro-batch-major",
                          2).parts["launch"] == pytest.approx(4 * 2 * 3 * 0.01)      # no hooks on a kept group
    # layer-major: the same compute, the copies once per step (0.5 s)
    lm = cost.step_time(DEVICE, PROFILE, GROUPS, 1, 1, 2, "layer-major", 2)
    assert lm.step == pytest.approx(t.step - 0.5)
    # on a device whose copies overlap compute, two slots: both groups stay in the slots, nothing is copied
    overlapping = dataclasses.replace(DEVICE, copies_overlap=True)
    assert cost.step_time(overlapping, PROFILE, GROUPS, 2, 1, 2, "micro-batch-major", 2).parts["copies"] == 0
    # one slot never overlaps; a slow link makes the copies the bottleneck once they are overlapped
    slow = dataclasses.replace(overlapping, h2d_pinned=1.0)
    three = GROUPS + [GroupPlan("a", 3, 4, 400, False)]
    hidden = cost.step_time(slow, PROFILE, three, 2, 1, 2, "micro-batch-major", 2)
    assert hidden.overlapped and hidden.step == hidden.parts["copies"] == 2 * (400 + 200)
    assert hidden.bottleneck == "host-to-device copies"


def test_each_streamer_loads_2n_minus_2_slots_groups_per_pass():
    groups = [GroupPlan(node, i, i + 1, 10 * i + (node == "b"), False) for node in ("a", "b") for i in range(5)]
    forward, backward = group_loads(groups, 2)
    assert len(forward) + len(backward) == 2 * (2 * 5 - 4)
    assert forward == [20, 30, 40, 21, 31, 41] and backward == [0, 10, 20, 1, 11, 21]
    assert traffic(groups, 1, "micro-batch-major", 3) == 3 * (sum(g.bytes for g in groups) * 2 - 40 - 41 - 0 - 1)
    resident = [dataclasses.replace(g, resident=True) for g in groups]
    assert group_loads(resident, 2) == ([], []) and traffic(groups[:2], 2, "layer-major", 4) == 0


def test_built_in_profiles_cite_their_sources():
    assert set(devices.BUILT_IN) == {"rtx3090", "rtx4090", "rtx5090", "a100-40gb", "a100-80gb", "l4", "h100",
                                     "h100-pcie", "h200", "cpu"}
    for p in devices.BUILT_IN.values():
        assert "FLOPS" in p.source and ("GB/s" in p.source or "TB/s" in p.source)
        assert "PCIe" in p.source if p.name != "cpu" else "conservative" in p.source and not p.copies_overlap
    h100, l4 = devices.BUILT_IN["h100"], devices.BUILT_IN["l4"]
    assert h100.gemm["bf16"] > l4.gemm["bf16"] and h100.h2d_pinned == 2 * l4.h2d_pinned     # PCIe 5 against 4
    assert devices.resolve("RTX4090") is devices.BUILT_IN["rtx4090"]
    # a CUDA card's name picks its own profile: the PCIe H100 is not the SXM one (756 against 989 dense TFLOPS)
    assert [re.search(pattern, "NVIDIA H100 PCIe") is not None for pattern, _ in devices.CARDS].index(True) == \
        [name for _, name in devices.CARDS].index("h100-pcie")
    with pytest.raises(UserError, match="neither a built-in profile"):
        devices.resolve("rtx9999")


def test_a_cpu_run_is_priced_by_a_cpu_profile_the_measured_one_when_found(tmp_path, monkeypatch):
    """Without a measured profile a CPU run is priced by the built-in CPU profile, never a card's; a measured one is
    found; the report says which profile priced the plan."""
    monkeypatch.setenv("LOWMEM_GRAPH_CACHE", str(tmp_path))
    spec = load_preset("tiny")
    default = make_plan(spec, 2 ** 30, 8, 64, 2 ** 34, main="cpu")
    assert default.device is devices.BUILT_IN["cpu"] and default.device.compute_dtype == "fp32"
    assert "predicted time on cpu (built-in conservative CPU profile" in format_plan(default, spec)
    slow = dataclasses.replace(default.device, gemm={k: v / 10 for k, v in default.device.gemm.items()},
                               source="measured by hand")
    path = devices.save(slow, devices.profiles_dir() / "cpu.json")
    found = make_plan(spec, 2 ** 30, 8, 64, 2 ** 34, main="cpu")
    assert found.device == dataclasses.replace(slow, origin=str(path)) and found.timing.step > default.timing.step
    assert f"predicted time on cpu (measured by hand; profile read from {path})" in format_plan(found, spec)
    # a file given by hand, and a broken one (one line, exit 2)
    path = devices.save(slow, tmp_path / "mine.json")
    assert make_plan(spec, 2 ** 30, 8, 64, 2 ** 34, device=str(path)).device.origin == str(path)
    (tmp_path / "bad.json").write_text("{")
    assert cli.main(["plan", "--preset", "tiny", "--gpu-mem", "1G", "--profile", str(tmp_path / "bad.json")]) == 2


def test_plan_prints_times_bottleneck_and_runners_up(capsys):
    assert cli.main(["plan", "--preset", "paper", "--gpu-mem", "6G", "--host-mem", "64G", "--profile", "h100"]) == 0
    out = capsys.readouterr().out
    assert "predicted time on h100" in out and "bottleneck" in out and "runners-up" in out
    plan = make_plan(load_preset("paper"), 6 * 2 ** 30, host_budget=2 ** 36, device="h100")
    assert plan.runners_up and all(r["timing"].step >= plan.timing.step for r in plan.runners_up)
    assert all(r["timing"].why_slower(plan.timing) in out for r in plan.runners_up)


def test_paper_70b_plans_offline_on_a_24g_card_with_predicted_times(capsys):
    """The paper graph with a Llama-3.1-70B-class refiner (its configuration shipped): planned from the meta
    device, no download, with predicted step and epoch times."""
    spec = load_preset("paper-70b")
    plan = make_plan(spec, 24 * 2 ** 30, host_budget=2 ** 37, device="rtx4090")
    big = [g for g in plan.groups if g.node == "llama70b"]
    assert big[0].first == 60 and big[-1].last == 80 and max(plan.peak, plan.eval_peak) <= plan.budget
    paper = make_plan(load_preset("paper"), 24 * 2 ** 30, host_budget=2 ** 37, device="rtx4090")
    assert plan.timing.step > 3 * paper.timing.step           # 20 layers of width 8192 against Mistral's 8 of 4096
    assert cli.main(["plan", "--preset", "paper-70b", "--gpu-mem", "24G", "--host-mem", "128G",
                     "--profile", "rtx4090"]) == 0
    assert "predicted time on rtx4090" in capsys.readouterr().out


def test_at_2g_batch_16_the_planner_avoids_the_traffic_cliff():
    """The issue's case: at 2G and batch 16 the fixed preferences ranked two slots above traffic and took the
    micro-batch loop at 43.8 GB per step; by predicted time the layer-major schedule wins, moving a tenth of that."""
    paper = load_preset("paper")
    plan = make_plan(paper, 2 * 2 ** 30, 16, host_budget=2 ** 36, device="rtx4090")
    assert plan.schedule.startswith("layer-major") and plan.traffic_per_step < 5e9
    loop = make_plan(paper, 2 * 2 ** 30, 16, host_budget=2 ** 36, device="rtx4090", schedules=("micro-batch-major",))
    assert loop.traffic_per_step > 4 * plan.traffic_per_step and loop.timing.step > plan.timing.step


@pytest.mark.parametrize("ref", ["openai-community/gpt2", "microsoft/CodeGPT-small-py", "meta-llama/Llama-3.2-1B",
                                 "Qwen/Qwen2.5-1.5B", "google/gemma-2-2b", "microsoft/Phi-3-mini-4k-instruct",
                                 "mistralai/Mistral-7B-v0.1"])
def test_a_layer_is_charged_the_matrices_its_architecture_has(ref):
    """A layer's matmul FLOPs and dequantisation count the weight matrices the model really has (GPT-2: two in its
    MLP, Conv1D; the gated MLPs: three), counted here on the unconverted model: every 2-D parameter of a layer."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowmem_graph.loading import decoder_parts, load_config, meta_model
    from lowmem_graph.memory.profile import node_profile

    config, model = meta_model(ref)
    with torch.device("meta"):
        _, layers, _ = decoder_parts(AutoModelForCausalLM.from_config(load_config(ref, prefer_bundled=True)[0]))
    matrices = sum(p.numel() for p in layers[0].parameters() if p.dim() == 2)
    node = node_profile("n", "refiner", config, model, "nf4", 0, 0)
    run = cost.layer_run(DEVICE, node, tokens=3, seq=3)
    assert run["gemm"] * DEVICE.gemm["bf16"] == pytest.approx(2 * matrices * 3 + 4 * 3 * 3 * node.q_dim)
    assert run["dequant"] * DEVICE.nf4_dequant == pytest.approx(matrices)
    if "gpt" in ref.lower():        # c_attn, c_proj, c_fc, mlp.c_proj: 3 + 1 + 4 + 4 = 12 d^2, not 16
        assert matrices == 12 * node.width ** 2


def test_calibration_times_a_layer_call_through_our_hooks():
    """The launch cost bench/calibrate.py measures includes what a planned run adds to each layer call: the hook
    registry's dispatch and the group's checkpoint (every layer of the timed model runs through them)."""
    import sys
    from pathlib import Path

    import torch

    from lowmem_graph.memory import checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import calibrate

    calls = []
    real = checkpoint.GroupCheckpoint._run

    def counted(self, g, pos, index, forward, args, kwargs):
        calls.append(index)
        return real(self, g, pos, index, forward, args, kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(checkpoint.GroupCheckpoint, "_run", counted)
        launch, hooks = calibrate.launch_cost(torch.device("cpu"))
    assert launch > 0 and hooks >= 0
    # checkpointed, 6 layers and 2, each a warm-up and 20 timed steps: every layer through its hook once a step
    assert sorted(set(calls)) == list(range(6)) and len(calls) == 21 * (6 + 2)
