"""The disk tier's plan (memory/disk.py): under a host budget the layer groups that do not fit live in the node cache
on disk, the cheapest to read back first; the plan shows them and the bytes read per step, the cost model the
time of those reads."""
import dataclasses

import pytest
from test_cost import DEVICE, PROFILE

from lowmem_graph import cli
from lowmem_graph.memory import cost
from lowmem_graph.memory.estimate import GroupPlan
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


def test_plan_command_shows_the_70b_plan_under_32g_of_host_memory(capsys):
    assert cli.main(["plan", "--preset", "paper-70b", "--gpu-mem", "24G", "--host-mem", "32G",
                     "--profile", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert "training step" in out and "epoch" in out and "vs 32,768 MiB available" in out
    assert "(layers 0-" in out      # the frozen pass table names the layers on disk
