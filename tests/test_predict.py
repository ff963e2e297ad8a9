"""Asking a trained graph (lowmem-graph predict, TrainedGraph) and exporting a run as a folder that loads back."""
import json
from pathlib import Path

import pytest

from lowmem_graph import TrainedGraph, export_run
from lowmem_graph.cli import main
from lowmem_graph.data import bundled_dir
from lowmem_graph.errors import UserError


@pytest.fixture
def run(short_run):
    return short_run


def test_predict_a_file_gives_what_eval_gives(run, tmp_path, capsys):
    rows = (bundled_dir() / "ARC-Easy-Dev.jsonl").read_text().splitlines()[:6]
    questions = tmp_path / "six.jsonl"
    questions.write_text("\n".join(rows) + "\n")
    assert main(["eval", str(run), "--split", "validation", "--limit", "6", "--out", str(tmp_path / "eval.jsonl"),
                 "--no-progress"]) == 0
    assert main(["predict", str(run), "--input", str(questions), "--out", str(tmp_path / "p.jsonl"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    evaluated = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    predicted = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predicted] == [e["id"] for e in evaluated]
    for p, e in zip(predicted, evaluated):
        assert list(p["probs"].values()) == e["probs"]
        assert p["answer"] == "ABCDE"[e["prediction"]] and p["correct"] == e["correct"]
        assert p["answer_text"] == p["choices"][e["prediction"]]
    assert f"{sum(e['correct'] for e in evaluated)}/6 right where the answer was given" in out


def _prefix_entries(run) -> set:
    from lowmem_graph.tiny import cache_root
    from lowmem_graph.train import load_run_config

    folder = Path(load_run_config(run)[1].cache_dir or cache_root() / "prefix")
    return set(folder.iterdir()) if folder.is_dir() else set()


def test_one_question_on_the_command_line_and_through_the_api(run, tmp_path, capsys):
    before = _prefix_entries(run)
    assert main(["predict", str(run), "--question", "Which gas do plants take in?", "--choices", "oxygen",
                 "carbon dioxide", "helium", "--out", str(tmp_path / "q.jsonl"), "--no-progress"]) == 0
    assert _prefix_entries(run) == before           # a one-off question leaves no prefix-cache entries behind
    out = capsys.readouterr().out
    (record,) = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert set(record["probs"]) == {"A", "B", "C"} and sum(record["probs"].values()) == pytest.approx(1, abs=1e-4)
    assert record["probs"][record["answer"]] == max(record["probs"].values()) and "label" not in record
    for letter, text in zip("ABC", ["oxygen", "carbon dioxide", "helium"]):
        assert f"{letter}. {text}" in out and f"{record['probs'][letter]:.3f}" in out
    assert f"answer: {record['answer']} ({record['answer_text']})" in out
    api = TrainedGraph(run).predict([{"question": "Which gas do plants take in?",
                                      "choices": ["oxygen", "carbon dioxide", "helium"]}])
    assert api[0]["probs"] == record["probs"]


def test_an_exported_run_loads_back_and_checks_its_weights(run, tmp_path):
    question = [{"question": "What melts ice?", "choices": ["heat", "cold"], "answer": "heat"}]
    before = TrainedGraph(run).predict(question)
    folder = export_run(run, tmp_path / "export")
    assert {p.name for p in folder.iterdir()} == {"config.yaml", "trainable.safetensors", "metrics.jsonl",
                                                   "README.md", "export.json"}
    assert not (folder / "trainable.safetensors").is_symlink()
    card = (folder / "README.md").read_text()
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert f"accuracy **{last['eval_acc']:.3f}**" in card and "`tiny:llama`" in card
    after = TrainedGraph(folder).predict(question)
    assert after == before and after[0]["label"] == "A"
    with pytest.raises(UserError, match="exists"):
        export_run(run, folder)
    data = bytearray((folder / "trainable.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "trainable.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the SHA-256 in export.json"):
        TrainedGraph(folder)


@pytest.mark.parametrize("argv, words", [
    (["--question", "Q?"], "needs at least two --choices"),
    (["--question", "Q?", "--choices", "a", "b", "--input", "x.jsonl"], "not both or neither"),
    ([], "not both or neither"),
    (["--input", "missing.jsonl"], "no file at missing.jsonl"),
])
def test_predict_errors_are_one_line(run, capsys, argv, words):
    assert main(["predict", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err


def test_a_legacy_run_exports_its_weights_as_safetensors(run, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from lowmem_graph.runstate import trainable_weights

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copyfile(run / "config.yaml", legacy / "config.yaml")
    weights = trainable_weights(run)
    rng = {"python": (3, tuple(range(625)), None), "numpy": ("MT19937", list(range(624)), 0, 0, 0.0),
           "torch": torch.get_rng_state()}
    torch.save({"step": 2, "trainable": weights, "optimizer": {}, "scheduler": {}, "rng": rng},
               legacy / "checkpoint.pt")
    folder = export_run(legacy, tmp_path / "export")
    assert not (folder / "trainable.safetensors").is_symlink()
    exported = load_file(str(folder / "trainable.safetensors"))
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)
