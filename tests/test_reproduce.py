"""The reproduction command end to end on CPU: tiny graph, a subsample of the real ARC/OpenBookQA files."""
import json

import pytest
import torch

from lowmem_graph.cli import main

from conftest import shared_data


@pytest.mark.slow
def test_reproduce_tiny_on_shared_data(tmp_path, capsys, monkeypatch):
    from lowmem_graph.train import PlacedGraph

    data = shared_data()
    # the test sets' frozen passes run with the trainables' weights alone: no gradients, no AdamW states
    seen, frozen_states, optimizers = [], PlacedGraph.frozen_states, []

    class AdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    def recording(self, *sets):
        seen.append((any(p.grad is not None for p in self.graph.parameters()), sum(len(o.state) for o in optimizers)))
        return frozen_states(self, *sets)

    monkeypatch.setattr(torch.optim, "AdamW", AdamW)

    monkeypatch.setattr(PlacedGraph, "frozen_states", recording)
    code = main(["reproduce", "--preset", "tiny", "--tasks", "arc-challenge,openbookqa", "--data-dir", str(data),
                 "--limit-train", "16", "--limit-test", "16", "--epochs", "1", "--run-dir", str(tmp_path / "r"),
                 "--no-progress"])
    assert code == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    rows = {r["benchmark"]: r for r in results["rows"]}
    assert rows["arc-challenge"]["n"] == 16 and rows["openbookqa"]["n"] == 16
    assert rows["mmlu"]["status"].startswith("not run")
    assert "mmlu:auxiliary_train" not in results["train"]["task"]
    table = (tmp_path / "r" / "results.md").read_text()
    assert "| arc-challenge |" in table and "87.3" in table
    assert (tmp_path / "r" / "predictions-openbookqa-test.jsonl").exists()
    assert len(seen) == 3 and seen == [(False, 0)] * 3     # training's, then one per test set


def test_protocol_never_trains_on_mmlu_test():
    from lowmem_graph.reproduce import load_protocol

    protocol = load_protocol(__import__("pathlib").Path(__import__("lowmem_graph").__file__).parent
                             / "presets" / "reproduce_paper.yaml")
    parts = protocol["train"]["task"].split("+")
    mmlu = [p for p in parts if p.startswith("mmlu")][0]
    assert "test" not in mmlu.split(":")[1].split("@")[0].split(",") and mmlu.endswith("@14042")


def test_reproduce_reads_its_graph_as_every_command_does(tmp_path, monkeypatch):
    """--graph is read by settings.load_config, the one reader of a config file: a run's config.yaml of the older
    form (the mappings graph: and train:) is taken, its training settings under the protocol's."""
    import yaml

    from lowmem_graph import reproduce
    from lowmem_graph.spec import preset_path

    raw = yaml.safe_load(preset_path("tiny").read_text())
    older = tmp_path / "config.yaml"
    older.write_text(yaml.safe_dump({"graph": {k: v for k, v in raw.items() if k != "train"},
                                     "train": {**raw.get("train", {}), "weight_decay": 0.125}}))
    seen = {}

    def ran(spec, cfg, benchmarks, run_dir, limit_test=None, progress=True):
        seen.update(spec=spec, cfg=cfg)
        return run_dir / "results.md"

    monkeypatch.setattr(reproduce, "reproduce", ran)
    assert main(["reproduce", "--graph", str(older), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    assert [n.name for n in seen["spec"].nodes] == [n["name"] for n in raw["nodes"]]
    assert seen["cfg"].weight_decay == 0.125
