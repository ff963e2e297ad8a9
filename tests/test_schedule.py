"""The layer-major schedule: every micro-batch through a streamed group while it is loaded. The same gradients as
the micro-batch loop, each streamed group copied twice per step instead of twice per micro-batch."""
import dataclasses
import weakref

import pytest
import torch
from deferred_copies import DeferredCopies

from lowmem_graph.ablate import apply_changes
from lowmem_graph.cache import PrefixCache
from lowmem_graph.questions import format_prompt
from lowmem_graph.edge_graph import EdgeGraph
from lowmem_graph.frozen_pass import run_frozen_pass
from lowmem_graph.memory.budget import parse_size
from lowmem_graph.memory.estimate import GroupPlan, cached_on_device, group_loads, traffic
from lowmem_graph.memory.placement import Placement
from lowmem_graph.memory.report import format_plan
from lowmem_graph.memory.search import make_plan
from lowmem_graph.spec import load_preset
from lowmem_graph.step import step_gradients

SPEC = apply_changes(load_preset("tiny"), ["nodes.phi3.inject_depth=0.25", "nodes.mistral.inject_depth=0.25"])
MICRO, BATCH = 2, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lowmem_graph.data import load_task

    graph = EdgeGraph.build(SPEC, "cpu", seed=0)
    questions = load_task("arc-easy", "train", limit=BATCH)
    states = run_frozen_pass(graph, [(q.id, format_prompt(q)) for q in questions],
                             PrefixCache(tmp_path_factory.mktemp("cache")), BATCH, progress=False)
    base = make_plan(SPEC, parse_size("1G"), BATCH, SPEC.max_length)
    groups = [GroupPlan(n, i, i + 1, 0, resident=False) for n in ("phi3", "mistral") for i in (1, 2, 3)]
    return graph, questions, states, dataclasses.replace(base, groups=groups, prefetch_depth=2, micro_batch=MICRO)


def _step(graph, questions, states, plan):
    """The step's results, and the most micro-batches whose cached states were alive at once."""
    placement = Placement("cpu", plan)
    placement.start_steps(graph)
    live, most = [0], [0]

    def counted(part):
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(next(iter(part[0].values())), lambda: live.__setitem__(0, live[0] - 1))
        return part

    try:
        graph.zero_grad(set_to_none=True)
        parts = ((batch, counted(states.for_batch(graph, batch)))
                 for batch in (graph.collate(questions[i:i + MICRO]) for i in range(0, BATCH, MICRO)))
        loss, correct, routing = step_gradients(graph, parts, BATCH, "cpu", placement)
        grads = {n: p.grad.clone() for n, p in graph.named_parameters()}
        loads = [s.loads for s in placement.streamers]
        return float(loss), int(correct), routing.clone(), grads, loads, placement.kept.fetched, most[0]
    finally:
        placement.stop_steps()


@pytest.mark.parametrize("schedule", ["layer-major", "layer-major-host"])
def test_layer_major_gives_the_same_gradients_with_each_group_loaded_twice(setup, schedule, monkeypatch):
    graph, questions, states, plan = setup
    loss, correct, routing, grads, loads, _, live = _step(graph, questions, states, plan)
    DeferredCopies().install(monkeypatch)       # layer-major's groups wait for their copies as CUDA would need
    lm_loss, lm_correct, lm_routing, lm_grads, lm_loads, fetched, lm_live = _step(
        graph, questions, states, dataclasses.replace(plan, schedule=schedule))
    # the cached states the planner counts on the device: two micro-batches in the loop, the batch in layer-major
    assert live * MICRO == cached_on_device("micro-batch-major", MICRO, BATCH) == 2 * MICRO
    assert lm_live * MICRO == cached_on_device(schedule, MICRO, BATCH) == BATCH
    assert lm_loss == pytest.approx(loss, rel=1e-6) and lm_correct == correct
    torch.testing.assert_close(lm_routing, routing, rtol=1e-5, atol=1e-7)
    assert grads.keys() == lm_grads.keys()
    assert all(grads[k].abs().sum() > 0 for k in grads if k.startswith(("project", "readout")))   # through 4-bit
    for name in grads:
        torch.testing.assert_close(lm_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # three streamed groups per refiner, two slots: the micro-batch loop copies all three forward and the first
    # again for backward (4), then two per further micro-batch (the top two stay in the slots across the turn);
    # layer-major copies as much for all four micro-batches as the loop does for one
    assert loads == [4 + 2 * 3] * 2
    assert lm_loads == [4] * 2
    assert (fetched > 0) == (schedule == "layer-major-host")


@pytest.mark.parametrize("schedule, depth", [("micro-batch-major", 2), ("layer-major", 1)])
def test_the_predicted_traffic_is_what_the_streamers_load(setup, schedule, depth):
    """A step after a step (the steady state) loads what `traffic` predicts: per refiner, 2(n - slots) groups per
    forward and backward (the slots still hold the last groups when the backward starts, and the first ones when
    the next forward does), per micro-batch or once per step."""
    graph, questions, states, plan = setup
    sizes = {(g.node, g.first): 1 + g.first for g in plan.groups}      # distinct sizes: which groups, not only how many
    groups = [dataclasses.replace(g, bytes=sizes[g.node, g.first]) for g in plan.groups]
    plan = dataclasses.replace(plan, groups=groups, prefetch_depth=depth, schedule=schedule)
    placement = Placement("cpu", plan)
    placement.start_steps(graph)
    loaded = []         # the size of every group loaded in the last step
    for name, streamer in zip(graph.stepped_layers(), placement.streamers):
        mine = [g for g in groups if g.node == name]

        def load(rank, streamer=streamer, mine=mine, original=streamer._load):
            if streamer._in_slot[streamer._slot(rank)] != rank:
                loaded.append(mine[streamer.order[rank]].bytes)
            original(rank)
        streamer._load = load
    try:
        for _ in range(2):
            loaded.clear()
            parts = ((batch, states.for_batch(graph, batch))
                     for batch in (graph.collate(questions[i:i + MICRO]) for i in range(0, BATCH, MICRO)))
            step_gradients(graph, parts, BATCH, "cpu", placement)
            graph.zero_grad(set_to_none=True)
    finally:
        placement.stop_steps()
    forward, backward = group_loads(groups, depth)
    assert len(loaded) == (len(forward) + len(backward)) * (BATCH // MICRO if schedule == "micro-batch-major" else 1)
    assert sum(loaded) == traffic(groups, depth, schedule, BATCH // MICRO) > 0


def test_the_planner_picks_layer_major_where_it_cuts_traffic():
    paper = load_preset("paper")
    roomy = make_plan(paper, parse_size("24G"), host_budget=64 * 2 ** 30)
    assert roomy.schedule == "micro-batch-major" and roomy.traffic_per_step == 0
    small = make_plan(paper, parse_size("2G"), host_budget=64 * 2 ** 30)
    assert small.accumulation > 1 and small.streamed_bytes > 0
    assert small.schedule.startswith("layer-major")
    assert small.traffic_per_step <= 5e9                   # the goal; the micro-batch loop: 8.2 GB
    old = traffic(small.groups, small.prefetch_depth, "micro-batch-major", small.accumulation)
    assert old > 2 * small.traffic_per_step
    assert f"{small.schedule} schedule" in format_plan(small, paper)
    if small.schedule == "layer-major-host":
        assert small.host_breakdown["kept_activations"] > 0 and small.activation_traffic > 0


def test_layer_major_runs_a_graph_of_any_shape(tmp_path, monkeypatch):
    """examples/three_layers.yaml: the middle model is steered, then read at its top into the latent the top model
    receives, so its groups' backward must reach the maps upstream through the top model's. Every group of both is
    loaded once forward and once backward (less the two left in the slots), and the gradients are the loop's."""
    from pathlib import Path

    from lowmem_graph.data import load_task
    from lowmem_graph.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "three_layers.yaml")
    graph = EdgeGraph.build(spec, "cpu", seed=0)
    questions = load_task("arc-easy", "train", limit=BATCH)
    states = run_frozen_pass(graph, [(q.id, format_prompt(q)) for q in questions], PrefixCache(tmp_path), BATCH,
                             progress=False)
    stepped = graph.stepped_layers()
    assert set(stepped) == {"gemma2", "mistral"}
    groups = [GroupPlan(n, i, i + 1, 0, resident=False) for n, (first, top) in stepped.items()
              for i in range(first, top)]
    base = make_plan(spec, parse_size("1G"), BATCH, spec.max_length)
    plan = dataclasses.replace(base, groups=groups, prefetch_depth=2, micro_batch=MICRO)
    loss, correct, routing, grads, loads, _, _ = _step(graph, questions, states, plan)
    DeferredCopies().install(monkeypatch)
    lm_loss, lm_correct, lm_routing, lm_grads, lm_loads, _, _ = _step(
        graph, questions, states, dataclasses.replace(plan, schedule="layer-major"))
    assert lm_loss == pytest.approx(loss, rel=1e-6) and lm_correct == correct
    assert all(grads[k].abs().sum() > 0 for k in grads if k.startswith("project"))     # through two frozen models
    for name in grads:
        torch.testing.assert_close(lm_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert lm_loads == [2 * (top - first) - 2 for first, top in stepped.values()]
