"""Specialists added and removed without retraining the rest (`--init-from RUN`, `--train-only new-edges`,
per-edge `train: false`)."""
import copy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lowmem_graph.cli import main
from lowmem_graph.edge_graph import EdgeGraph
from lowmem_graph.errors import UserError
from lowmem_graph.grow import start_from
from lowmem_graph.settings import TrainConfig
from lowmem_graph.spec import from_dict, load_spec

PAIR = Path(__file__).resolve().parents[1] / "examples" / "residual_coupling.yaml"
QUICK = ["--epochs", "1", "--limit-train", "16", "--limit-eval", "4", "--no-progress"]


def _trio(path: Path) -> Path:
    """The pair with qwen2 added, bridged both ways with llama and read by the output; its edges listed first, so
    every edge of the pair has another index (and parameter name) here."""
    raw = yaml.safe_load(PAIR.read_text())
    raw["name"] = "trio"
    raw["nodes"].append({"name": "qwen2", "model": "tiny:qwen2"})
    bridge = {"read": 2, "pooling": "token", "at": 3, "kind": "bridge"}
    raw["edges"] = [{"from": "qwen2", "to": "llama", **bridge}, {"from": "llama", "to": "qwen2", **bridge}] + raw["edges"]
    raw["output"]["reads"].append("qwen2")
    path.write_text(yaml.safe_dump(raw))
    return path


def _perplexity(graph, weights: Path, closed=()) -> dict:
    """Each read node's held-out perplexity through the graph with these weights, the gates `closed` shut."""
    from lowmem_graph.objectives import NextToken
    from lowmem_graph.text import load_text

    graph.load_trainable(load_file(str(weights)), str(weights))
    with torch.no_grad():
        for key in closed:
            graph.gate[key].fill_(-float("inf"))
    return NextToken("coupled").evaluate(graph, graph, load_text("openbook-facts", "validation", 4), 4, False)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A trained pair, then a third model joined to it with only the new bridges training."""
    t = tmp_path_factory.mktemp("grow")
    assert main(["train", "--graph", str(PAIR), "--run-dir", str(t / "pair"), *QUICK]) == 0
    assert main(["train", "--graph", str(_trio(t / "trio.yaml")), "--run-dir", str(t / "trio"), "--init-from",
                 str(t / "pair"), "--train-only", "new-edges", *QUICK]) == 0
    return t


def test_a_third_model_joins_a_trained_pair_without_moving_it(grown):
    pair = load_file(str(grown / "pair" / "weights-coupled.safetensors"))
    trio = load_file(str(grown / "trio" / "weights-coupled.safetensors"))
    renamed = {"0-llama-mistral": "2-llama-mistral", "1-mistral-llama": "3-mistral-llama"}
    for old, new in renamed.items():            # the pair's edges: frozen, exactly as the pair trained them
        assert torch.equal(trio[f"bridge.{new}.weight"], pair[f"bridge.{old}.weight"])
        assert torch.equal(trio[f"gate.{new}"], pair[f"gate.{old}"])
    for new in ("0-qwen2-llama", "1-llama-qwen2"):      # the new ones trained
        assert float(trio[f"gate.{new}"]) != -2.0
    # with the new bridges' gates closed, the pair's models score as the pair did
    trio_graph = EdgeGraph.build(load_spec(grown / "trio.yaml"), "cpu", objective="lm")
    pair_graph = EdgeGraph(load_spec(PAIR), {n: trio_graph.nodes[n] for n in ("llama", "mistral")}, "lm")
    closed = _perplexity(trio_graph, grown / "trio" / "weights-coupled.safetensors", ("0-qwen2-llama", "1-llama-qwen2"))
    before = _perplexity(pair_graph, grown / "pair" / "weights-coupled.safetensors")
    for node in ("llama", "mistral"):
        assert closed[node] == pytest.approx(before[node], rel=1e-6)
    ran = {r: yaml.safe_load((grown / r / "lm-results.json").read_text())["coupled"]["perplexity"]
           for r in ("pair", "trio")}
    assert ran["trio"]["llama"] != pytest.approx(ran["pair"]["llama"], rel=1e-3)   # open, qwen2 does reach llama


def test_removing_a_node_drops_its_edges_and_keeps_the_others(grown):
    graph = EdgeGraph.build(load_spec(PAIR), "cpu", seed=1, objective="lm")
    shared, frozen = start_from(graph, grown / "trio")
    trio = load_file(str(grown / "trio" / "weights-coupled.safetensors"))
    assert shared == ["0-llama-mistral", "1-mistral-llama"] and frozen == []
    assert torch.equal(graph.bridge["0-llama-mistral"].weight, trio["bridge.2-llama-mistral.weight"])
    assert all(p.requires_grad for p in graph.parameters())


def test_an_edge_marked_train_false_stays_as_it_starts(tmp_path):
    raw = yaml.safe_load(PAIR.read_text())
    raw["edges"][1]["train"] = False
    graph = EdgeGraph.build(from_dict(copy.deepcopy(raw), "pair.yaml"), "cpu", seed=0, objective="lm")
    assert start_from(graph, None) == ([], ["1-mistral-llama"])
    assert not graph.bridge["1-mistral-llama"].weight.requires_grad and not graph.gate["1-mistral-llama"].requires_grad
    assert graph.bridge["0-llama-mistral"].weight.requires_grad
    raw["edges"][1]["train"] = "no"
    with pytest.raises(UserError, match="train must be true or false"):
        from_dict(raw, "pair.yaml")
    with pytest.raises(UserError, match="train_only must be left out without init_from"):
        TrainConfig.from_dict({"train_only": "new-edges"})
    with pytest.raises(UserError, match="not a run folder"):
        start_from(graph, tmp_path)


def _steps(run: Path) -> list:
    from lowmem_graph.runstate import read_metrics

    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "step"]


def _same_run(run: Path, straight: Path) -> None:
    assert _steps(run) == _steps(straight) and len(_steps(run)) == 8
    a, b = (load_file(str(r / "weights-coupled.safetensors")) for r in (run, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_grown_run_resumes_as_it_would_have_run_without_reading_its_origin_again(grown, tmp_path):
    """Resumed from its checkpoint, a run started with --init-from has the uninterrupted run's figures to the bit,
    even when the run it grew from is gone; resumed before its first checkpoint (a kill), it takes that run's
    weights again only if they are still those it started from."""
    import json
    import shutil

    from safetensors.torch import save_file

    from lowmem_graph.files import file_sha256

    origin = tmp_path / "pair"
    shutil.copytree(grown / "pair", origin)
    grow = ["train", "--graph", str(_trio(tmp_path / "trio.yaml")), "--init-from", str(origin), "--train-only",
            "new-edges", *QUICK, "--epochs", "2", "--batch-size", "4"]
    assert main([*grow, "--run-dir", str(tmp_path / "straight")]) == 0
    for cut in ("cut", "killed"):
        assert main([*grow, "--run-dir", str(tmp_path / cut), "--max-steps", "3"]) == 0
    shutil.move(origin, tmp_path / "away")          # the run it grew from is gone: the checkpoint holds the rest
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    _same_run(tmp_path / "cut", tmp_path / "straight")

    killed = tmp_path / "killed"            # as a kill before the first checkpoint leaves it
    for name in ("checkpoint", "trainable.safetensors", "metrics.jsonl"):
        (killed / name).unlink()
    shutil.rmtree(killed / ".checkpoints")
    shutil.copytree(tmp_path / "away", origin)
    weights = load_file(str(origin / "weights-coupled.safetensors"))        # the origin trained on meanwhile
    save_file({k: v + 1 for k, v in weights.items()}, str(origin / "weights-coupled.safetensors"))
    results = json.loads((origin / "lm-results.json").read_text())
    results["coupled"]["sha256"] = file_sha256(origin / "weights-coupled.safetensors")
    (origin / "lm-results.json").write_text(json.dumps(results))
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 2
    shutil.rmtree(origin)
    shutil.copytree(tmp_path / "away", origin)
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    _same_run(killed, tmp_path / "straight")


def test_a_grown_runs_record_is_what_it_took_and_a_damaged_one_is_refused(grown, tmp_path):
    import json

    from lowmem_graph.files import file_sha256
    from lowmem_graph.grow import RECORD

    graph = EdgeGraph.build(load_spec(PAIR), "cpu", seed=1, objective="lm")
    assert start_from(graph, grown / "trio", None, tmp_path, load=False) == (["0-llama-mistral", "1-mistral-llama"], [])
    record = json.loads((tmp_path / RECORD).read_text())
    assert record["sha256"] == file_sha256(grown / "trio" / "weights-coupled.safetensors")
    assert record["shared"] == {"0-llama-mistral": "2-llama-mistral", "1-mistral-llama": "3-mistral-llama"}
    for damaged in ("{", json.dumps({"sha256": 1, "shared": {}}), json.dumps({"shared": []})):
        (tmp_path / RECORD).write_text(damaged)
        with pytest.raises(UserError, match="init-from.json is damaged"):
            start_from(graph, grown / "trio", None, tmp_path)
