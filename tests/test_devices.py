"""Nodes on chosen devices: a node's `device:` in the spec; activations cross at the edges; each device planned
against its own budget. This machine has one device, so the runtime is run with two "cpu" devices through the
same code path, and the per-device planner (arithmetic) with CUDA device names."""
import dataclasses
import json

import pytest
import torch

from lowmem_graph.ablate import apply_changes
from lowmem_graph.cli import main
from lowmem_graph.errors import UserError
from lowmem_graph.memory.budget import check_device_room, device_needs, parse_budgets, parse_size
from lowmem_graph.memory.estimate import cached_on_device
from lowmem_graph.memory.profile import CUDA_CONTEXT, _profile
from lowmem_graph.memory.search import _remote_head, make_plan
from lowmem_graph.spec import load_preset

GiB = 2 ** 30


def test_budgets_per_device_are_read_and_checked():
    assert parse_budgets("24G") == 24 * GiB
    assert parse_budgets("cuda:0=24G, cuda:1=12G") == {"cuda:0": 24 * GiB, "cuda:1": 12 * GiB}
    assert parse_budgets("cuda=6G") == {"cuda:0": 6 * GiB}
    with pytest.raises(UserError, match="'gpu1' is not a device"):
        parse_budgets("gpu1=4G")


def test_each_device_is_planned_against_its_own_budget():
    spec = apply_changes(load_preset("paper"), ["nodes.mistral.device=cuda:1"])
    plan = make_plan(spec, {"cuda:0": 12 * GiB, "cuda:1": 8 * GiB}, 8, 512, host_budget=10 ** 12)
    assert plan.devices["cuda:1"]["nodes"] == ["mistral"] and plan.devices["cuda:0"]["main"]
    for device in plan.devices.values():
        assert max(device["peak"], device["eval_peak"]) <= device["budget"]
    assert {g.node for g in plan.groups} == {"phi3", "mistral"}
    one_size = make_plan(spec, 8 * GiB, 8, 512, host_budget=10 ** 12)      # one size: every device gets it
    assert set(one_size.devices) == {"cuda:0", "cuda:1"}
    with pytest.raises(UserError, match="names no budget for cuda:1, where mistral computes"):
        make_plan(spec, {"cuda:0": 12 * GiB}, 8, 512)
    with pytest.raises(UserError, match=r"does not fit: cuda:1 needs .* \(budget 0.50 GiB\)"):
        make_plan(spec, {"cuda:0": 12 * GiB, "cuda:1": parse_size("512M")}, 8, 512)
    with pytest.raises(UserError, match="device must be cpu, cuda or cuda:N"):
        apply_changes(load_preset("tiny"), ["nodes.mistral.device=tpu"])


def test_a_plan_the_card_cannot_hold_for_other_programs_is_refused_with_a_budget_that_fits(monkeypatch):
    """--gpu-mem says what the run may take; a desktop or another run may hold part of the card. A plan whose peak
    (past the context allowance) exceeds what is free is refused before anything loads, naming a budget that is."""
    paper = load_preset("paper")
    free = {}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[str(device)], 24 * GiB))
    plan = make_plan(paper, 24 * GiB, 8, 512, host_budget=10 ** 12)
    need = device_needs(plan, "cuda:0")["cuda:0"]
    assert need == max(plan.peak, plan.eval_peak, plan.frozen_pass_peak)
    free["cuda:0"] = need - CUDA_CONTEXT
    check_device_room(plan, "cuda:0")
    check_device_room(plan, "cpu")                     # planned as on a GPU, run on the CPU: no check
    free["cuda:0"] = 2 * GiB + 300 * 2 ** 20
    reserved = {"cuda:0": need}         # an earlier run in this process left its blocks cached: they are ours
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved[str(device)])
    check_device_room(plan, "cuda:0")
    reserved["cuda:0"] = 0
    with pytest.raises(UserError, match=r"needs up to .* on cuda:0, but only 2.29 GiB of its 24.00 GiB is free") as e:
        check_device_room(plan, "cuda:0")
    budget = str(e.value).split("--gpu-mem ")[1]
    assert budget == "2.8G"
    check_device_room(make_plan(paper, parse_size(budget), 8, 512, host_budget=10 ** 12), "cuda:0")
    # nodes on devices of their own: each device against its own free memory, its nodes' frozen passes included
    spec = apply_changes(paper, ["nodes.mistral.device=cuda:1"])
    split = make_plan(spec, {"cuda:0": 12 * GiB, "cuda:1": 8 * GiB}, 8, 512, host_budget=10 ** 12)
    needs = device_needs(split, "cuda:0")
    assert needs["cuda:1"] >= split.frozen["mistral"].peak and needs["cuda:0"] >= split.devices["cuda:0"]["peak"]
    free.update({"cuda:0": 24 * GiB, "cuda:1": needs["cuda:1"] - CUDA_CONTEXT - 1})
    reserved.update({"cuda:1": 0})
    with pytest.raises(UserError, match="on cuda:1"):
        check_device_room(split, "cuda:0")


def test_a_node_on_a_device_of_its_own_trains_like_the_rest(tmp_path):
    """Two "cpu" devices (the run's and a node's own) through the code path that moves activations across: the
    losses are the single-device run's."""
    runs = {}
    for name, extra in [("one", []), ("two", ["--set", "nodes.mistral.device=cpu", "--set", "nodes.llama.device=cpu"])]:
        runs[name] = tmp_path / name
        assert main(["train", "--run-dir", str(runs[name]), "--epochs", "1", "--limit-train", "16", "--limit-eval",
                     "8", "--no-progress", "--cache-dir", str(tmp_path / "cache"), *extra]) == 0

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "step"]

    torch.testing.assert_close(losses(runs["two"]), losses(runs["one"]))
    config = (runs["two"] / "config.yaml").read_text()
    assert "device: cpu" in config


def test_cached_states_go_to_the_device_that_reads_them():
    """A refiner on a card of its own gets its cached stream there directly (not through the run's device, which
    its plan does not charge); reader states and reads go where the trainable maps are."""
    from types import SimpleNamespace

    from lowmem_graph import transfer
    from lowmem_graph.graph import Batch

    graph = SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]),
                            nodes={"phi3": SimpleNamespace(device=torch.device("cpu")),
                                   "mistral": SimpleNamespace(device=torch.device("meta"))})
    batch = Batch({}, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), ["a", "b"])
    states = {"prefix:mistral:2": torch.ones(2, 4, 6), "tokens:mistral:5": torch.ones(2), "mean:phi3:3": torch.ones(2)}
    _, parts = transfer.arrive(transfer.pack(graph, batch, states))
    assert {k: v.device.type for k, v in parts.items()} == {"prefix:mistral:2": "meta", "tokens:mistral:5": "cpu",
                                                             "mean:phi3:3": "cpu"}


def test_the_run_device_counts_the_head_of_refiners_computing_elsewhere():
    """Both refiners on cuda:1: their final states come to cuda:0 in fp32 for the readout and output node, which
    cuda:0's step must hold (it counted only the trainables and the context)."""
    spec = apply_changes(load_preset("paper"), ["nodes.mistral.device=cuda:1", "nodes.phi3.device=cuda:1"])
    plan = make_plan(spec, {"cuda:0": 2 * GiB, "cuda:1": 24 * GiB}, 8, 512, host_budget=10 ** 12)
    profile = _profile(spec)
    head = _remote_head([profile.nodes["phi3"], profile.nodes["mistral"]], profile.latent,
                                 plan.micro_batch, plan.seq)
    cached = cached_on_device("micro-batch-major", plan.micro_batch, plan.batch)   # (and the next one's)
    readers = cached * 4 * sum(profile.reader_widths)                                     # pooled, fp32
    assert plan.breakdown["head_activations"] == head + readers and head > 0
    assert plan.devices["cuda:0"]["peak"] == sum(plan.breakdown.values()) <= 2 * GiB
    token = make_plan(dataclasses.replace(spec, injection="token"), {"cuda:0": 2 * GiB, "cuda:1": 24 * GiB}, 8, 512,
                      host_budget=10 ** 12)
    assert token.breakdown["head_activations"] - plan.breakdown["head_activations"] >= readers * (512 - 1)


def test_out_of_memory_names_the_plan_of_the_card_that_ran_out():
    from lowmem_graph.memory.report import out_of_memory_message

    spec = apply_changes(load_preset("paper"), ["nodes.mistral.device=cuda:1"])
    plan = make_plan(spec, {"cuda:0": 12 * GiB, "cuda:1": 8 * GiB}, 8, 512, host_budget=10 ** 12)
    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity "
                                        "of 11.7 GiB of which 1.2 GiB is free.")
    peak = plan.devices["cuda:1"]["peak"] / GiB
    assert f"predicted a peak of {peak:.2f} GiB within 8.00 GiB on cuda:1;" in out_of_memory_message(error, plan)
    one = make_plan(load_preset("paper"), 6 * GiB, 8, 512, host_budget=10 ** 12)
    assert f"predicted a peak of {one.peak / GiB:.2f} GiB within 6.00 GiB;" in out_of_memory_message(error, one)


def test_the_peaks_of_every_card_a_run_computes_on_are_reported(monkeypatch):
    from types import SimpleNamespace

    from lowmem_graph.memory.report import format_snapshot
    from lowmem_graph.train import Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    spec = apply_changes(load_preset("paper"), ["nodes.mistral.device=cuda:1", "nodes.phi3.device=cuda:2"])
    assert Trainer._other_cards(SimpleNamespace(device=torch.device("cuda", 0), spec=spec)) == ("cuda:1", "cuda:2")
    assert Trainer._other_cards(SimpleNamespace(device=torch.device("cuda", 2), spec=spec)) == ("cuda:1",)
    assert Trainer._other_cards(SimpleNamespace(device=torch.device("cpu"), spec=load_preset("paper"))) == ()
    text = format_snapshot({"host_rss_mb": 900.0, "cuda_peak_allocated_mb": 5000.0, "cuda_peak_reserved_mb": 5200.0,
                            "cuda:1_peak_allocated_mb": 3100.4})
    assert text.endswith("GPU peak 5000 MiB allocated / 5200 MiB reserved, cuda:1 peak 3100 MiB allocated")
