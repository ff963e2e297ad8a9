"""Ablations as flags and the run matrix."""
import json

import pytest

from lowmem_graph.ablate import apply_changes, run_matrix, summarise, variants
from lowmem_graph.errors import UserError
from lowmem_graph.spec import load_preset
from lowmem_graph.train import TrainConfig


def test_changes_cover_the_ablations():
    spec = load_preset("tiny")
    changed = apply_changes(spec, ["drop=gemma2", "nodes.phi3.inject_depth=0.5", "nodes.mistral.blend=0.1",
                                   "nodes.llama.pooling=last", "latent_dim=16", "nodes.qwen2.role=refiner"])
    assert [n.name for n in changed.nodes] == ["llama", "qwen2", "phi3", "mistral"]
    assert changed.nodes[2].inject_depth == 0.5 and changed.nodes[3].blend == 0.1
    assert changed.readers[0].pooling == "last" and changed.latent_dim == 16
    assert [n.name for n in changed.refiners] == ["qwen2", "phi3", "mistral"]
    assert spec.latent_dim == 32 and len(spec.nodes) == 5          # the original is untouched


@pytest.mark.parametrize("change, expected", [
    ("latent_dim", "expected key=value"),
    ("drop=nobody", "no node named 'nobody'"),
    ("nodes.nobody.blend=0.5", "nodes.<name>.<field>"),
    ("nodes.phi3.blend=2", "blend must be in [0, 1]"),
    ("nodes.phi3.colour=red", "unknown field(s) colour"),
])
def test_bad_changes(change, expected):
    with pytest.raises(UserError, match=__import__("re").escape(expected)):
        apply_changes(load_preset("tiny"), [change])


def test_variants_are_the_cartesian_product():
    assert variants([]) == [[]]
    assert variants(["a=1,2", "drop=x,y"]) == [["a=1", "drop=x"], ["a=1", "drop=y"], ["a=2", "drop=x"],
                                                ["a=2", "drop=y"]]


@pytest.mark.slow
def test_matrix_has_one_row_per_variant_and_seed(tmp_path):
    spec = load_preset("tiny")
    cfg = TrainConfig.from_dict({**spec.train, "limit_train": 8, "limit_eval": 8, "epochs": 1})
    rows = run_matrix(spec, cfg, ["nodes.phi3.blend=0,0.5"], [0, 1], tmp_path, progress=False, log=lambda *_: None)
    assert [(r["variant"], r["seed"]) for r in rows] == [("nodes.phi3.blend=0", 0), ("nodes.phi3.blend=0", 1),
                                                          ("nodes.phi3.blend=0.5", 0), ("nodes.phi3.blend=0.5", 1)]
    summary = json.loads((tmp_path / "matrix.json").read_text())["summary"]
    assert [s["seeds"] for s in summary] == [2, 2]
    assert "| nodes.phi3.blend=0.5 | 2 |" in (tmp_path / "matrix.md").read_text()


def test_summary_statistics():
    rows = [{"variant": "a", "eval_acc": x} for x in (0.2, 0.4)] + [{"variant": "b", "eval_acc": 0.5}]
    a, b = summarise(rows)
    assert a["mean"] == pytest.approx(0.3) and a["std"] == pytest.approx(0.1414, abs=1e-4) and b["std"] == 0.0
