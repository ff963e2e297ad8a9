"""The frozen-prefix cache: same training with and without it; damaged entries are rebuilt, never used."""
import json

import pytest
import torch

from lowmem_graph.cache import PrefixCache
from frozen_run import prefix_of, read_of

from lowmem_graph.edge_graph import EdgeGraph
from lowmem_graph.spec import load_preset
from lowmem_graph.train import TrainConfig, train


def precompute(graph, questions, cache, batch_size=16, placements=None):
    """The frozen pass as a run makes it: every node on the CPU, or placed as `placements` (per node) say."""
    from types import SimpleNamespace

    from lowmem_graph.frozen_pass import run_frozen_pass
    from lowmem_graph.memory.placement import Placement

    plan = SimpleNamespace(frozen=placements) if placements is not None else None
    return run_frozen_pass(graph, _items(questions), cache, batch_size, False, Placement("cpu", plan))


def _items(questions):
    from lowmem_graph.questions import format_prompt

    return [(q.id, format_prompt(q)) for q in questions]


def entry(states, name):
    """A node's one entry in the frozen pass's states (each node of the tiny preset has one part)."""
    (found,) = [e for key, e in states.entries.items() if key.split(":")[1] == name]
    return found


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


@pytest.mark.parametrize("injection", ["pooled", "token"])
def test_training_from_the_cache_follows_the_same_losses(tmp_path, injection):
    from dataclasses import replace

    spec = replace(load_preset("tiny"), injection=injection)
    base = {**spec.train, "limit_train": 24, "limit_eval": 8, "epochs": 2, "lr": 3e-3,
            "cache_dir": str(tmp_path / "cache")}
    quiet = dict(progress=False, log=lambda *_: None)
    cached = train(spec, TrainConfig.from_dict({**base, "prefix_cache": True}), tmp_path / "cached", **quiet)
    plain = train(spec, TrainConfig.from_dict({**base, "prefix_cache": False}), tmp_path / "plain", **quiet)
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 10      # 5 nodes x (train, eval)
    torch.testing.assert_close(_losses(tmp_path / "cached"), _losses(tmp_path / "plain"), rtol=1e-4, atol=1e-5)
    assert cached["eval_acc"] == pytest.approx(plain["eval_acc"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-manifest", "shard-missing"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, tiny_spec, tiny_nodes, questions, damage):
    graph = EdgeGraph(tiny_spec, tiny_nodes)
    messages = []
    cache = PrefixCache(tmp_path, log=messages.append, shard_bytes=4096)
    first = precompute(graph, questions, cache)
    reference = entry(first, "phi3").row(3).clone()
    victim = sorted(entry(first, "phi3").folder.glob("shard-*.safetensors"))[1]
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif damage == "truncate":
        victim.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "no-manifest":
        (victim.parent / "manifest.json").unlink()
    else:
        victim.unlink()
    again = precompute(graph, questions, cache)
    assert len(messages) == 1 and victim.parent.name in messages[0] and "rebuilding" in messages[0]
    assert torch.equal(entry(again, "phi3").row(3), reference)
    precompute(graph, questions, cache)
    assert len(messages) == 1          # intact now


def test_entries_are_sharded_and_rows_belong_to_their_questions(tmp_path, tiny_spec, tiny_nodes, questions):
    """The pass runs questions longest first and writes shards as it goes; row(i) is still question i's."""
    from lowmem_graph.questions import format_prompt
    from lowmem_graph.nodes import pool

    graph = EdgeGraph(tiny_spec, tiny_nodes)
    states = precompute(graph, questions, PrefixCache(tmp_path, shard_bytes=256), batch_size=4)
    for name in ("qwen2", "mistral"):                   # a reader and a refiner
        node, part = tiny_nodes[name], entry(states, name)
        assert len(part.shards) > 1 and len(part) == len(questions)
        for i in (0, 5, len(questions) - 1):
            enc = node.encode([format_prompt(questions[i])])
            alone = (pool(read_of(node, **enc), enc["attention_mask"], node.spec.pooling) if name == "qwen2"
                     else prefix_of(node, **enc)[0])
            torch.testing.assert_close(part.row(i), alone, rtol=1e-4, atol=1e-5)


def test_a_full_disk_is_refused_before_the_pass(tmp_path, tiny_spec, tiny_nodes, questions, monkeypatch):
    import shutil
    from collections import namedtuple

    from lowmem_graph.errors import UserError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    graph = EdgeGraph(tiny_spec, tiny_nodes)
    with pytest.raises(UserError, match=r"needs about .* GiB, but .* free"):
        precompute(graph, questions, PrefixCache(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_disk_too_small_for_the_whole_pass_is_refused_before_the_first_node(tmp_path, tiny_spec, tiny_nodes,
                                                                             questions, monkeypatch):
    """Every missing entry of every set counts at once: a disk that holds the first nodes' entries but not the last
    one's is refused before any is written. Entries already cached count nothing."""
    import shutil
    from collections import namedtuple

    from lowmem_graph.errors import UserError
    from lowmem_graph.frozen_pass import check_cache_room

    graph, cache = EdgeGraph(tiny_spec, tiny_nodes), PrefixCache(tmp_path)
    sets = [questions[:10], questions[10:]]
    one = sum(f.stat().st_size for f in entry(precompute(graph, sets[0], cache), "mistral").folder.glob("shard-*"))
    shutil.rmtree(tmp_path)
    usage = namedtuple("usage", "total used free")
    free = [10 ** 12]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 12, 0, free[0]))
    check_cache_room(graph, [_items(q) for q in sets], cache)
    free[0] = one                # room for one refiner's entry of the first set, not for the pass
    with pytest.raises(UserError, match=r"will write about .* GiB to the prefix cache, but .* free"):
        check_cache_room(graph, [_items(q) for q in sets], cache)
    assert not any(tmp_path.iterdir())
    precompute(graph, sets[0], cache)
    precompute(graph, sets[1], cache)
    free[0] = 0
    check_cache_room(graph, [_items(q) for q in sets], cache)        # everything cached: nothing to write
    check_cache_room(graph, [[]], cache)        # a set left empty (all of it trained on) writes nothing


def test_key_follows_the_data_and_the_prefix(tmp_path, tiny_spec, tiny_nodes, questions):
    from dataclasses import replace

    graph = EdgeGraph(tiny_spec, tiny_nodes)
    cache = PrefixCache(tmp_path)
    precompute(graph, questions[:8], cache)
    precompute(graph, questions[:9], cache)
    assert len(list(tmp_path.glob("*/manifest.json"))) == 10
    node = tiny_nodes["llama"]
    original = node.spec
    node.spec = replace(original, prefix="Another framing.\n")
    try:
        precompute(graph, questions[:8], cache)
    finally:
        node.spec = original
    assert len(list(tmp_path.glob("*/manifest.json"))) == 11


def test_a_frozen_pass_streamed_as_planned_stores_the_same_entries(tmp_path, tiny_spec, tiny_nodes, questions,
                                                                   streamers_made):
    """Under a small budget each node's frozen-pass layers are placed as the plan says, resident or streamed
    one layer at a time through two slots (readers keep their first layer resident, refiners stream them
    all). The entries are the same bytes."""
    from lowmem_graph.memory.estimate import FrozenPlacement, GroupPlan

    made = streamers_made
    graph = EdgeGraph(tiny_spec, tiny_nodes)
    placements = {}
    for name, node in tiny_nodes.items():
        needed = node.read_layer + 1 if node.spec.role == "reader" else node.inject_layer
        groups = [GroupPlan(name, i, i + 1, 0, resident=i == 0 and node.spec.role == "reader")
                  for i in range(needed)]
        placements[name] = FrozenPlacement(groups, 2, {})
    plain = precompute(graph, questions, PrefixCache(tmp_path / "plain"), batch_size=4)
    assert made == []                                   # nodes already on the device: nothing moves
    streamed = precompute(graph, questions, PrefixCache(tmp_path / "streamed"), batch_size=4, placements=placements)
    assert len(made) == len(tiny_nodes)
    batches = len(questions) // 4
    for streamer in made:
        n = len(streamer.order)
        assert n >= 2 and streamer.slots == []          # released after the pass
        # two groups stay in the two slots. Three: each batch ends by prefetching group 0 into the free slot (the
        # slots swap between passes), so only the very first group waits; every batch copies all three.
        assert n in (2, 3)
        assert (streamer.loads, streamer.misses) == ((2, 1) if n == 2 else (3 * batches + 1, 1))
    assert not any("forward" in vars(layer) for node in tiny_nodes.values() for layer in node.layers)
    for name in tiny_nodes:
        a, b = entry(plain, name), entry(streamed, name)
        assert len(a) == len(b) == len(questions)
        for i in range(len(questions)):
            assert torch.equal(a.row(i), b.row(i)), (name, i)


def test_the_frozen_pass_says_up_front_how_long_it_will_take(tmp_path, tiny_spec, tiny_nodes, questions, capsys):
    """One line, once, after the first node's first batches (before the others run); none when all is cached."""
    from lowmem_graph.frozen_pass import run_frozen_pass

    graph = EdgeGraph(tiny_spec, tiny_nodes)
    cache = PrefixCache(tmp_path)
    run_frozen_pass(graph, _items(questions), cache, 4, True)
    err = capsys.readouterr().err.splitlines()
    said = [line for line in err if line.startswith("frozen pass: ")]
    assert len(said) == 1 and said[0].startswith("frozen pass: 16 texts through 5 nodes, about ")
    assert said[0].endswith(" (timed on its first batches; cached for later runs)")
    first = next(i for i, line in enumerate(err) if line.startswith("caching "))
    assert err.index(said[0]) < next(i for i, line in enumerate(err[first:], first) if "qwen2" in line)
    run_frozen_pass(graph, _items(questions), cache, 4, True)
    assert "frozen pass" not in capsys.readouterr().err
