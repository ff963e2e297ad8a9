"""Nodes on chosen devices: a node's `device:` in the spec; activations cross at the edges; each device planned
against its own budget. This machine has one device, so the runtime is run with two "cpu" devices through the
same code path, and the per-device planner (arithmetic) with CUDA device names."""
import json

import pytest
import torch

from lowmem_graph.ablate import apply_changes
from lowmem_graph.cli import main
from lowmem_graph.errors import UserError
from lowmem_graph.memory.plan import make_plan, parse_budgets, parse_size
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
