"""Graphs written as nodes, latents and edges: checked as graphs, the paper's shape run as before."""
from pathlib import Path

import pytest
import yaml

from lowmem_graph.drawing import draw
from lowmem_graph.errors import UserError
from lowmem_graph.spec import from_dict, load_preset, load_spec
from lowmem_graph.topology import Edge, Topology, check_acyclic, edges_of, parse

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_the_presets_in_the_edges_form_are_the_graphs_they_were(name):
    assert load_preset(name) == load_spec(DATA / f"{name}_roles.yaml")      # old-form YAML still loads, the same


def test_a_role_form_graph_written_as_edges_comes_back_the_same(tmp_path):
    spec = load_spec(DATA / "tiny_roles.yaml")
    topology = edges_of(spec)
    raw = yaml.safe_load((DATA / "tiny_roles.yaml").read_text())
    for node in raw["nodes"]:
        for key in ("role", "read_layer", "pooling", "inject_depth", "blend"):
            node.pop(key, None)
    raw.pop("latent_dim")
    raw.pop("injection")
    raw["latents"] = [{"name": n, "dim": d} for n, d in topology.latents.items()]
    raw["edges"] = [{k: v for k, v in {"from": e.source, "to": e.target, "read": e.read,
                                       "pooling": e.pooling if e.read is not None else None, "at": e.at,
                                       "blend": e.blend if e.at is not None else None}.items() if v is not None}
                    for e in topology.edges]
    raw["output"]["reads"] = topology.reads
    assert from_dict(raw, "edges.yaml") == spec


def test_the_same_losses_from_either_form(tmp_path):
    from lowmem_graph.cli import main
    from lowmem_graph.runstate import read_metrics

    losses = []
    for i, graph in enumerate([DATA / "tiny_roles.yaml", None]):
        run = tmp_path / f"run{i}"
        argv = ["--graph", str(graph)] if graph else ["--preset", "tiny"]
        assert main(["train", *argv, "--epochs", "1", "--limit-train", "16", "--limit-eval", "8", "--run-dir",
                     str(run), "--no-progress"]) == 0
        losses.append([r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "step"])
    assert losses[0] == losses[1] and len(losses[0]) == 2


def _topology(edges, latents=None, nodes=("a", "b", "c"), reads=("c",)):
    return Topology(list(nodes), latents or {}, [Edge(**e) for e in edges], list(reads))


def test_bridges_both_ways_run_in_lockstep_and_are_not_a_cycle():
    bridges = [{"source": "a", "target": "b", "read": 4, "at": 5, "kind": "bridge"},
               {"source": "b", "target": "a", "read": 4, "at": 5, "kind": "bridge"}]
    check_acyclic(_topology(bridges, reads=("a", "b"), nodes=("a", "b")), "coupled.yaml")


def test_a_three_layer_graph_keeps_its_edges_and_a_cycle_is_named():
    raw = {"nodes": [{"name": n, "model": f"tiny:{m}"} for n, m in [("r", "llama"), ("mid", "qwen2"),
                                                                     ("top", "mistral")]],
           "latents": [{"name": "z1", "dim": 32}, {"name": "z2", "dim": 32}],
           "edges": [{"from": "r", "read": -1, "to": "z1"}, {"from": "z1", "to": "mid", "at": 0.5},
                     {"from": "mid", "read": -1, "to": "z2"}, {"from": "z2", "to": "top", "at": 0.75}],
           "output": {"reads": ["top"], "heads": 4}}
    topology = parse(raw, "three.yaml")
    assert [e.target for e in topology.edges] == ["z1", "mid", "z2", "top"]
    spec = from_dict(raw, "three.yaml")
    assert spec.by_edges and spec.output.reads == ["top"] and [n.role for n in spec.nodes] == ["node"] * 3
    assert from_dict(spec.to_dict(), "saved.yaml").edges == spec.edges     # a run's config.yaml loads back
    raw["edges"].append({"from": "top", "read": 2, "to": "z1"})
    with pytest.raises(UserError, match="cycle: z1 -> mid, mid -> z2, z2 -> top, top -> z1"):
        parse(raw, "three.yaml")


def test_a_latent_between_nodes_in_lockstep_is_a_cycle():
    edges = [{"source": "a", "target": "b", "read": 2, "at": 3, "kind": "bridge"},
             {"source": "a", "target": "z", "read": 4}, {"source": "z", "target": "b", "at": 0.5}]
    with pytest.raises(UserError, match="the graph has a cycle: z -> b, a -> z"):
        check_acyclic(_topology(edges, {"z": 8}, nodes=("a", "b"), reads=("b",)), "g.yaml")


def test_inspect_draws_the_graph(tmp_path, capsys):
    from lowmem_graph.cli import main

    assert main(["inspect", "--preset", "paper", "--draw", str(tmp_path / "paper.png")]) == 0
    assert "drawing: " in capsys.readouterr().out and (tmp_path / "paper.png").stat().st_size > 10_000
    bridged = _topology([{"source": "a", "target": "b", "read": 4, "at": 5, "kind": "bridge"},
                         {"source": "b", "target": "a", "read": 4, "at": 5, "kind": "bridge"}],
                        nodes=("a", "b"), reads=("a", "b"))
    assert draw(bridged, tmp_path / "coupled.png").stat().st_size > 5_000


@pytest.mark.parametrize("source", ["tiny", "paper", "three_layers.yaml", "residual_coupling.yaml"])
def test_a_run_writes_its_graph_in_the_edges_form_and_it_loads_back_the_same(source, tmp_path):
    """config.yaml is the form a user writes (no roles) with every training setting, for the paper's shape and any
    other; read back, it is the same graph."""
    from lowmem_graph.settings import TrainConfig, load_run_config, save_config

    examples = Path(__file__).resolve().parents[1] / "examples"
    spec = load_spec(examples / source) if source.endswith(".yaml") else load_preset(source)
    cfg = TrainConfig.from_dict({**spec.train, "warmup": 0.2, "clip": 0.5, "weight_decay": 0.1})
    save_config(tmp_path, spec, cfg)
    text = (tmp_path / "config.yaml").read_text()
    raw = yaml.safe_load(text)
    assert "role:" not in text and "graph" not in raw and raw["edges"] and "latents" in raw
    again, cfg_again = load_run_config(tmp_path)
    strip = lambda s: {k: v for k, v in s.to_dict().items() if k != "train"}     # noqa: E731
    assert strip(again) == strip(spec) and cfg_again == cfg
