"""The frozen-prefix cache: same training with and without it; damaged entries are rebuilt, never used."""
import json

import pytest
import torch

from lowmem_graph.cache import PrefixCache
from lowmem_graph.graph import FrozenGraph
from lowmem_graph.spec import load_preset
from lowmem_graph.train import TrainConfig, train


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
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 10      # 5 nodes x (train, eval)
    torch.testing.assert_close(_losses(tmp_path / "cached"), _losses(tmp_path / "plain"), rtol=1e-4, atol=1e-5)
    assert cached["eval_acc"] == pytest.approx(plain["eval_acc"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-checksum"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, tiny_spec, tiny_nodes, questions, damage):
    graph = FrozenGraph(tiny_spec, tiny_nodes)
    messages = []
    cache = PrefixCache(tmp_path, log=messages.append)
    first = graph.precompute(questions, cache, progress=False)
    reference = first.entries["phi3"].row(3).clone()
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif damage == "truncate":
        victim.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        victim.with_suffix(".sha256").unlink()
    again = graph.precompute(questions, cache, progress=False)
    assert len(messages) == 1 and victim.name in messages[0] and "rebuilding" in messages[0]
    assert torch.equal(again.entries["phi3"].row(3), reference)
    assert not graph.precompute(questions, cache, progress=False) or len(messages) == 1   # intact now


def test_key_follows_the_data_and_the_prefix(tmp_path, tiny_spec, tiny_nodes, questions):
    from dataclasses import replace

    graph = FrozenGraph(tiny_spec, tiny_nodes)
    cache = PrefixCache(tmp_path)
    graph.precompute(questions[:8], cache, progress=False)
    graph.precompute(questions[:9], cache, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 10
    node = tiny_nodes["llama"]
    original = node.spec
    node.spec = replace(original, prefix="Another framing.\n")
    try:
        graph.precompute(questions[:8], cache, progress=False)
    finally:
        node.spec = original
    assert len(list(tmp_path.glob("*.safetensors"))) == 11
