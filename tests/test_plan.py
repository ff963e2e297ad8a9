"""The budget planner: sizes from meta models, residency, streaming, micro-batch, and clear refusals."""
import dataclasses
from itertools import pairwise

import pytest

from lowmem_graph.cli import cmd_plan
from lowmem_graph.errors import UserError
from lowmem_graph.memory import budget
from lowmem_graph.memory.budget import parse_size
from lowmem_graph.memory.estimate import CACHE_SHARD_BYTES, Plan, _kept_bytes, eval_breakdown, pinned_bound, traffic
from lowmem_graph.memory.profile import _profile, layer_bytes, trainable_count
from lowmem_graph.memory.report import GiB, MiB, format_plan
from lowmem_graph.memory.search import SEARCH_STEP, make_plan
from lowmem_graph.spec import load_preset


@pytest.fixture(autouse=True)
def roomy_host(monkeypatch):
    """Plans here are about the device; the host check has its own tests (this machine's free memory varies)."""
    monkeypatch.setattr(budget, "host_available", lambda: 64 * GiB)


@pytest.fixture(scope="module")
def paper():
    return load_preset("paper")


@pytest.fixture(scope="module")
def paper_low_inject():
    """The paper graph injecting at depth 0.25: 24 of 32 layers trained per refiner, so streaming must engage."""
    spec = load_preset("paper")
    spec.nodes = [dataclasses.replace(n, inject_depth=0.25) if n.role == "refiner" else n for n in spec.nodes]
    return spec


@pytest.mark.parametrize("text, expected", [
    ("24G", 24 * 2 ** 30), ("24GB", 24 * 2 ** 30), ("6GiB", 6 * 2 ** 30), ("512M", 512 * 2 ** 20),
    ("1.5g", 3 * 2 ** 29), ("10000000", 10_000_000), ("64k", 65536), ("2T", 2 * 2 ** 40), (" 8 gb ", 8 * 2 ** 30),
    ("100B", 100), (".5G", 2 ** 29),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "G", "-1G", "0", "0G", "1.5", "12X", "1e9", "6 GiBs", "5iB", "1..5G",
                                  "24"])
def test_parse_size_errors(text):
    with pytest.raises(UserError, match="memory size"):
        parse_size(text)


def test_layer_bytes_match_design_table(paper):
    sizes = layer_bytes(paper)
    assert set(sizes) == {"llama", "qwen", "gemma", "phi3", "mistral"}
    assert [len(sizes[n]) for n in ("llama", "qwen", "gemma", "phi3", "mistral")] == [16, 28, 26, 32, 32]
    # DESIGN.md section 5: one decoder layer in NF4 with double quant
    for node, mb in {"mistral": 113, "phi3": 59, "llama": 31, "qwen": 24, "gemma": 40}.items():
        assert sizes[node][0] / 1e6 == pytest.approx(mb, rel=0.05), node
    # all decoder layers of all five: 7.7 GB; the refiners' top quarter: 1.37 GB
    assert sum(map(sum, sizes.values())) / 1e9 == pytest.approx(7.7, rel=0.05)
    assert (sum(sizes["phi3"][24:]) + sum(sizes["mistral"][24:])) / 1e9 == pytest.approx(1.37, rel=0.05)
    # bf16: 2 bytes per parameter (Mistral's layer has 218M params)
    assert layer_bytes(paper, "bf16")["mistral"][0] == pytest.approx(2 * 218.1e6, rel=0.01)
    assert layer_bytes(paper, "fp32")["mistral"][0] == 2 * layer_bytes(paper, "bf16")["mistral"][0]


def _check_plan(plan: Plan):
    assert plan.peak == sum(plan.breakdown.values())
    assert plan.peak <= plan.budget and plan.frozen_pass_peak <= plan.budget
    assert plan.minimum <= plan.budget
    assert plan.batch % plan.micro_batch == 0 and plan.batch % plan.frozen_micro_batch == 0
    flags = [g.resident for g in plan.groups]
    assert flags == sorted(flags, reverse=True), "resident groups come first, only the overflow streams"
    assert all(g.checkpointed for g in plan.groups if not g.resident), "a streamed group is always recomputed"
    if plan.schedule != "micro-batch-major":
        assert all(g.checkpointed for g in plan.groups) and plan.accumulation > 1 and plan.streamed_bytes > 0
    streamed = [g.bytes for g in plan.groups if not g.resident]
    assert plan.prefetch_depth in ((0,) if not streamed else (1, 2))
    per_refiner = {}      # each refiner's streamer has its own slots, sized for its largest streamed group
    for g in plan.groups:
        if not g.resident:
            per_refiner[g.node] = max(per_refiner.get(g.node, 0), g.bytes)
    assert plan.breakdown["stream_slots"] == plan.prefetch_depth * sum(per_refiner.values())
    assert plan.streamed_bytes == sum(streamed)
    # the frozen pass: each node's needed layers from 0, in groups, resident first, the overflow streamed
    for name, placed in plan.frozen.items():
        assert [g.node for g in placed.groups] == [name] * len(placed.groups)
        assert placed.groups[0].first == 0 and all(a.last == b.first for a, b in pairwise(placed.groups))
        flags = [g.resident for g in placed.groups]
        assert flags == sorted(flags, reverse=True), name
        slot = max((g.bytes for g in placed.groups if not g.resident), default=0)
        assert placed.prefetch_depth in ((0,) if not slot else (1, 2))
        assert placed.breakdown["stream_slots"] == placed.prefetch_depth * slot
        assert placed.peak == sum(placed.breakdown.values()) <= plan.budget
    assert plan.frozen_pass_peak == max(p.peak for p in plan.frozen.values()) == plan.frozen[plan.frozen_node].peak


def test_paper_at_24g_everything_resident(paper):
    plan = make_plan(paper, parse_size("24G"))
    _check_plan(plan)
    assert plan.streamed_bytes == 0 and plan.prefetch_depth == 0 and plan.breakdown["stream_slots"] == 0
    assert plan.micro_batch == 8
    # room to spare: nothing is recomputed (every group keeps its activations), the plain step
    assert not any(g.checkpointed for g in plan.groups) and plan.breakdown["recompute"] < plan.breakdown[
        "checkpoint_inputs"]
    # at 6G micro-batch 8 fits only recomputing 14 of 16 layers; micro-batch 2 fits recomputing none, and the cost
    # model predicts it faster (the case: fewer matmul FLOPs beat fewer launches and dequantisations)
    tighter = make_plan(paper, parse_size("6G"))
    assert not any(g.checkpointed for g in tighter.groups) and tighter.micro_batch < 8
    assert all("recomputed" in r["kind"] and r["timing"].step > tighter.timing.step for r in tighter.runners_up)
    assert all(g.resident for g in plan.groups)
    # the trained groups are exactly each refiner's upper quarter, layers 24..31, in 2-4 layer groups
    for node in ("phi3", "mistral"):
        mine = [g for g in plan.groups if g.node == node]
        assert mine[0].first == 24 and mine[-1].last == 32
        assert all(a.last == b.first for a, b in pairwise(mine))
        assert all(2 <= g.last - g.first <= 4 for g in mine)
    # trainable: 17.6M (the paper's count), 16 bytes each
    assert plan.trainable_params == pytest.approx(17.6e6, rel=0.01)
    assert plan.breakdown["trainable+optimizer"] == 16 * plan.trainable_params
    assert plan.breakdown["cuda_context"] == 600 * MiB


@pytest.mark.parametrize("budget", ["12G", "8G", "6G"])
def test_paper_fits_small_cards(paper, budget):
    plan = make_plan(paper, parse_size(budget), batch=8, seq=512)
    _check_plan(plan)


def test_paper_minimum_is_exact(paper):
    plan = make_plan(paper, parse_size("24G"))
    assert GiB < plan.minimum < 6 * GiB
    assert plan.minimum == max(plan.minimum_training, plan.minimum_frozen)
    at_minimum = make_plan(paper, plan.minimum)
    _check_plan(at_minimum)
    assert at_minimum.minimum == plan.minimum
    with pytest.raises(UserError, match="needs at least"):
        make_plan(paper, plan.minimum - SEARCH_STEP)


def test_frozen_pass_streams_on_cards_too_small_to_hold_a_node(paper):
    sizes = layer_bytes(paper)
    needed = {n.name: n.read_index(len(sizes[n.name])) + 1 if n.role == "reader" else n.inject_index(32)
              for n in paper.nodes}
    roomy = make_plan(paper, parse_size("24G"))
    assert all(p.streamed_bytes == 0 for p in roomy.frozen.values())
    assert {name: p.groups[-1].last for name, p in roomy.frozen.items()} == needed
    # Mistral's 24 lower layers alone are 2.5 GiB: below that it must stream, and the budget still holds
    assert sum(sizes["mistral"][:24]) > 2.5 * GiB
    small = make_plan(paper, parse_size("2G"))
    _check_plan(small)
    assert small.frozen["mistral"].streamed_bytes > 0 and small.frozen["mistral"].prefetch_depth == 2
    assert small.frozen_micro_batch == 8           # streaming hides behind compute: keep the big micro-batch
    # so the frozen pass no longer sets the smallest budget: the training step does
    assert roomy.minimum_frozen < roomy.minimum_training == roomy.minimum < 2 * GiB
    text = format_plan(small, paper)
    assert "frozen pass" in text and "streamed" in text


@pytest.mark.parametrize("budget", ["1G", "512M"])
def test_too_small_names_the_minimum(paper, budget):
    minimum = make_plan(paper, parse_size("24G")).minimum
    with pytest.raises(UserError) as info:
        make_plan(paper, parse_size(budget))
    message = str(info.value)
    assert "needs at least" in message and f"{minimum:,} bytes" in message
    stated = float(message.split("needs at least ")[1].split(" GiB")[0])
    assert stated * GiB >= minimum and (stated - 0.01) * GiB < minimum
    make_plan(paper, int(stated * GiB))      # the stated number is enough


def test_smaller_budgets_shrink_micro_batch_before_streaming(paper):
    big = make_plan(paper, parse_size("24G"))
    small = make_plan(paper, big.minimum)
    assert small.micro_batch < big.micro_batch
    assert small.breakdown["recompute"] < big.breakdown["recompute"]


def test_streaming_fills_budget_with_resident_groups_first(paper_low_inject):
    spec = paper_low_inject
    roomy = make_plan(spec, parse_size("24G"))
    _check_plan(roomy)
    assert roomy.streamed_bytes == 0 and len([g for g in roomy.groups if g.node == "mistral"]) >= 6
    previous = 0
    for budget in ("5G", "4G", "3G"):
        plan = make_plan(spec, parse_size(budget))
        _check_plan(plan)
        assert 0 < plan.streamed_bytes <= sum(g.bytes for g in plan.groups), budget
        assert plan.prefetch_depth == 2
        assert plan.traffic_per_step == traffic(plan.groups, plan.prefetch_depth, plan.schedule, plan.accumulation,
                                                plan.activation_traffic)
        # less memory, never faster: what fits a smaller budget fits a larger one, and the planner takes the fastest
        assert plan.timing.step >= previous
        previous = plan.timing.step
    # the smallest budget streams nearly everything
    tight = make_plan(spec, roomy.minimum)
    _check_plan(tight)
    with pytest.raises(UserError, match="needs at least"):
        make_plan(spec, roomy.minimum - SEARCH_STEP)


def test_peak_within_budget_across_budgets(paper, paper_low_inject):
    for spec in (paper, paper_low_inject):
        for gib in (2, 3, 4, 5, 6, 8, 12, 24, 80):
            try:
                plan = make_plan(spec, gib * GiB)
            except UserError:
                assert gib * GiB < make_plan(spec, 80 * GiB).minimum
                continue
            _check_plan(plan)


def test_longer_sequences_need_more(paper):
    short = make_plan(paper, parse_size("24G"), seq=256)
    long = make_plan(paper, parse_size("24G"), seq=2048)
    assert long.minimum > short.minimum
    assert long.breakdown["recompute"] > short.breakdown["recompute"]


def test_bf16_weights_are_bigger(paper):
    bf16 = dataclasses.replace(paper, quant="bf16")
    plan = make_plan(bf16, parse_size("24G"))
    _check_plan(plan)
    assert plan.breakdown["workspace"] == 0
    assert plan.minimum > make_plan(paper, parse_size("24G")).minimum


def test_tiny_preset_plans():
    tiny = load_preset("tiny")
    plan = make_plan(tiny, parse_size("2G"))
    _check_plan(plan)
    assert plan.streamed_bytes == 0
    assert {g.node for g in plan.groups} == {"phi3", "mistral"}
    assert "tiny" in format_plan(plan, tiny)
    with pytest.raises(UserError, match="needs at least"):
        make_plan(tiny, parse_size("64M"))


def test_bad_arguments(paper):
    with pytest.raises(UserError):
        make_plan(paper, 0)
    with pytest.raises(UserError):
        make_plan(paper, 8 * GiB, batch=0)


def test_format_plan(paper):
    plan = make_plan(paper, parse_size("6G"))
    text = format_plan(plan, paper)
    for word in ("phi3", "mistral", "24-25", "resident", "predicted peak", "budget", "cuda_context",
                 "trainable+optimizer", "frozen pass", "smallest budget"):
        assert word in text, word
    assert text.count("resident") >= len(plan.groups)
    assert f"{plan.peak / MiB:,.0f} MiB" in text


def _parser():
    from lowmem_graph.cli import build_parser

    return build_parser()


def test_plan_command(capsys):
    args = _parser().parse_args(["plan", "--preset", "paper", "--gpu-mem", "6G"])
    assert args.batch == 8 and args.seq == 512 and args.func is cmd_plan
    args.func(args)
    out = capsys.readouterr().out
    assert "predicted peak" in out and "paper" in out
    args = _parser().parse_args(["plan", "--gpu-mem", "2G"])          # default preset: tiny
    args.func(args)
    assert "graph tiny" in capsys.readouterr().out


def test_plan_command_errors(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["plan", "--preset", "paper"])            # --gpu-mem is required
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _parser().parse_args(["plan", "--preset", "paper", "--graph", "x.yaml", "--gpu-mem", "6G"])
    capsys.readouterr()
    with pytest.raises(UserError, match="memory size"):
        cmd_plan(_parser().parse_args(["plan", "--preset", "paper", "--gpu-mem", "lots"]))
    with pytest.raises(UserError, match="needs at least"):
        cmd_plan(_parser().parse_args(["plan", "--preset", "paper", "--gpu-mem", "512M"]))


def test_plan_through_the_cli(capsys):
    from lowmem_graph import cli

    assert cli.main(["plan", "--preset", "paper", "--gpu-mem", "6G"]) == 0
    assert "predicted peak" in capsys.readouterr().out
    assert cli.main(["plan", "--preset", "paper", "--gpu-mem", "512M"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowmem-graph: error:") and "needs at least" in err


def test_evaluation_runs_at_the_plans_micro_batch_and_fits(paper):
    plan = make_plan(paper, parse_size("2G"))
    _check_plan(plan)
    assert plan.micro_batch < plan.batch and plan.eval_peak <= plan.budget
    profile = _profile(paper)
    at_batch = eval_breakdown(profile, plan.breakdown, plan.batch, plan.seq)
    assert sum(at_batch.values()) > plan.eval_peak       # the whole batch at once would hold more
    assert plan.eval_breakdown["resident_weights"] == plan.breakdown["resident_weights"]
    for budget in ("24G", "6G", "3G", "2G"):
        p = make_plan(paper, parse_size(budget))
        assert p.eval_peak <= p.budget and p.eval_breakdown["eval_activations"] > 0


def test_host_memory_holds_every_node_and_is_checked(paper):
    plan = make_plan(paper, parse_size("2G"))
    host = plan.host_breakdown
    # NF4 layers and bf16 embeddings of the five models, without lm_head (DESIGN.md: ~10.7 GB with the heads)
    assert host["frozen_nodes"] / 1e9 == pytest.approx(10.7 - 0.46 - 0.20, rel=0.05)
    assert host["slab_being_built"] == max([p.streamed_bytes for p in plan.frozen.values()]
                                           + [sum(g.bytes for g in plan.groups if g.node == n and not g.resident)
                                              for n in ("phi3", "mistral")])
    assert plan.host_peak == sum(host.values()) <= plan.host_available == 64 * GiB
    text = format_plan(plan, paper)
    assert "host memory" in text and "evaluation" in text and "frozen_nodes" in text
    with pytest.raises(UserError) as info:     # the embeddings, rows and runtime stay on the host (tests/test_disk.py)
        make_plan(paper, parse_size("2G"), host_budget=5 * GiB)
    message = str(info.value)
    assert "\n" not in message and "host memory" in message and "5.00 GiB is available" in message
    assert "even with every layer group on disk" in message


class PinnedAllocator:
    """torch's caching host allocator as it sizes memory (ATen/core/CachingHostAllocator.h): each allocation is
    rounded up to a power of two, served from a freed block of that size if there is one, else newly pinned; freed
    blocks are kept, never returned."""

    def __init__(self):
        self.free, self.held = {}, 0

    def allocate(self, nbytes):
        size = 1 << (nbytes - 1).bit_length()
        if self.free.get(size):
            self.free[size] -= 1
        else:
            self.held += size
        return size

    def release(self, size):
        self.free[size] = self.free.get(size, 0) + 1


def test_the_host_plan_bounds_what_the_pinned_allocator_holds():
    """Steps pin tensors whose size varies with each batch's longest prompt: whatever the sizes, what the
    allocator holds stays within pinned_bound of the largest, per tensor alive at once."""
    import random

    assert [pinned_bound(n) for n in (0, 1, 4096, 4097, 3 * MiB)] == [0, 2, 8192, 16384, 8 * MiB]
    rng = random.Random(0)
    largest, alive_at_once = 3 * MiB + 5, 6
    for _ in range(20):
        pool, alive = PinnedAllocator(), []
        for _ in range(300):
            if len(alive) == alive_at_once:
                pool.release(alive.pop(rng.randrange(alive_at_once)))
            alive.append(pool.allocate(rng.randint(1, largest)))
        assert pool.held <= alive_at_once * pinned_bound(largest)
    # the bound is reached: the sizes grow, bucket by bucket, with every tensor alive in each one
    pool = PinnedAllocator()
    for k in range(23):
        sizes = [pool.allocate(min(1 << k, largest)) for _ in range(alive_at_once)]
        for size in sizes:
            pool.release(size)
    assert pool.held > alive_at_once * pinned_bound(largest) * 0.99


def test_pinned_host_memory_is_planned_per_micro_batch_at_its_allocator_sizes(paper):
    small = make_plan(paper, parse_size("2G"))
    profile = _profile(paper)
    rows = [small.batch * small.seq * 2 * profile.nodes[n].width for n in ("phi3", "mistral")]
    host = small.host_breakdown
    assert host["prefix_cache_rows"] - 2 * CACHE_SHARD_BYTES >= 3 * sum(rows)   # two pinned, one padding
    if small.schedule == "layer-major-host":
        kept = sum(_kept_bytes(profile.nodes[n], sum(1 for g in small.groups if g.node == n),
                                        small.batch, small.seq) for n in ("phi3", "mistral"))
        assert kept < host["kept_activations"] <= 4 * kept


def test_plan_command_takes_the_host_memory_of_another_machine(capsys):
    args = _parser().parse_args(["plan", "--preset", "paper", "--gpu-mem", "6G", "--host-mem", "100G"])
    args.func(args)
    assert "vs 102,400 MiB available" in capsys.readouterr().out
    with pytest.raises(UserError, match="host memory"):
        cmd_plan(_parser().parse_args(["plan", "--preset", "paper", "--gpu-mem", "6G", "--host-mem", "4G"]))


@pytest.mark.parametrize("shape", ["paper", "separate", "three_layers", "coupled_lm", "coupled_choice"])
def test_the_trainable_count_from_widths_is_the_real_modules(shape):
    """The planner counts trainable parameters from the nodes' widths, building no graph module; the count is the
    one `inspect` reads off the real EdgeGraph on the meta device."""
    from pathlib import Path

    from lowmem_graph.spec import load_spec
    from lowmem_graph.summary import describe

    examples = Path(__file__).resolve().parents[1] / "examples"
    if shape in ("paper", "separate"):
        spec = load_preset("paper")
        spec.carry = "tied" if shape == "paper" else "separate"
    else:
        spec = load_spec(examples / ("three_layers.yaml" if shape == "three_layers" else "residual_coupling.yaml"))
        if shape == "coupled_choice":
            spec.train = {**spec.train, "objective": "choice"}
    shapes, parts = describe(spec)
    widths = {name: shape.width for name, shape in shapes.items()}
    assert trainable_count(spec, widths) == sum(parts.values())
