"""Training runs: run folder contents, exact resume, evaluation."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lowmem_graph.evaluate import predictions_name, wilson_interval
from lowmem_graph.spec import load_preset
from lowmem_graph.train import TrainConfig, train

SMALL = dict(limit_train=24, limit_eval=8, batch_size=8, epochs=2, lr=3e-3)


def _cfg(**kw):
    return TrainConfig.from_dict({**load_preset("tiny").train, **SMALL, **kw})


def test_stopped_and_resumed_run_ends_with_the_same_weights(tmp_path):
    spec = load_preset("tiny")
    train(spec, _cfg(), tmp_path / "straight", progress=False, log=lambda *_: None)
    stopped = train(spec, _cfg(max_steps=4), tmp_path / "resumed", progress=False, log=lambda *_: None)
    assert stopped["stopped_at_step"] == 4
    train(spec, _cfg(), tmp_path / "resumed", resume=True, progress=False, log=lambda *_: None)
    a = load_file(tmp_path / "straight" / "trainable.safetensors")
    b = load_file(tmp_path / "resumed" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == list(range(1, 7))
    # stopped mid-epoch 2 (3 steps an epoch): its summary still averages all of its steps, as the straight run's
    figures = ("epoch", "step", "train_loss", "train_acc", "eval_loss", "eval_acc", "eval_ci", "eval_n", "routing")
    epochs = {run: [{k: r[k] for k in figures} for r in map(json.loads, (tmp_path / run / "metrics.jsonl")
                                                           .read_text().splitlines()) if r["kind"] == "epoch"]
              for run in ("straight", "resumed")}
    assert len(epochs["resumed"]) == 2 and epochs["resumed"] == epochs["straight"]


def test_run_folder_has_everything(tmp_path):
    run = tmp_path / "run"
    summary = train(load_preset("tiny"), _cfg(epochs=1), run, progress=False, log=lambda *_: None)
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoint", "trainable.safetensors", "curves.png", "memory.png",
            "signals.png", "predictions-arc-easy-validation.jsonl"} <= names
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
    record = [r for r in epochs if r["kind"] == "epoch"][0]
    assert record["host_rss_mb"] > 0 and 0 <= record["eval_acc"] <= 1 and record["eval_n"] == 8
    assert set(record["routing"]) == {"phi3", "mistral"}
    assert 0 <= summary["eval_ci"][0] <= summary["eval_acc"] <= summary["eval_ci"][1] <= 1
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert set(step["grad_norms"]) == {"project.0-llama-z", "project.1-qwen2-z", "project.2-gemma2-z", "readout.phi3",
                                       "readout.mistral", "output"}
    assert 0 < step["reader_grad_share"] < 1
    assert sum(step["routing"].values()) == pytest.approx(1.0, abs=1e-5)
    # no pickles: tensors in safetensors, the rest JSON; trainable.safetensors is the checkpoint's own weights
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["state.json", "state.safetensors",
                                                                       "trainable.safetensors"]
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert {"step", "optimizer", "scheduler", "rng", "sha256"} <= set(state) and state["step"] == summary["steps"]
    assert (run / "trainable.safetensors").resolve() == (run / "checkpoint" / "trainable.safetensors").resolve()
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_a_predictions_file_name_has_no_separator_left_at_its_ends():
    assert predictions_name("folder/", "test") == "predictions-folder-test.jsonl"
    assert predictions_name("./data/mine.jsonl", "test") == "predictions-data_mine.jsonl-test.jsonl"
    assert predictions_name("hf:org/name+arc-easy", "validation") == "predictions-hf_org_name_arc-easy-validation.jsonl"
    assert predictions_name("/", "test") == "predictions-task-test.jsonl"


def test_micro_batches_give_the_same_step(tmp_path):
    from lowmem_graph.train import Trainer

    spec = load_preset("tiny")
    grads = []
    for micro in (8, 3):
        trainer = Trainer(spec, _cfg(prefix_cache=False), tmp_path / str(micro), progress=False, log=lambda *_: None)
        trainer.micro_batch = micro
        metrics = trainer.train_step(trainer.train_set[:8])
        grads.append((metrics["loss"], {n: p.grad.clone() for n, p in trainer.graph.named_parameters()}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for name, value in grads[0][1].items():
        torch.testing.assert_close(value, grads[1][1][name], rtol=1e-4, atol=1e-6)


def test_question_selection_takes_splits_and_limits_per_task():
    from conftest import shared_data

    from lowmem_graph.train import load_questions

    data = shared_data()
    both = load_questions("arc-challenge:train+openbookqa:train", "test", str(data))
    assert len(both) == 1119 + 4957
    limited = load_questions("arc-challenge+openbookqa:validation,test", "train", str(data), limit=5)
    assert len(limited) == 10 and limited[5].id != limited[0].id
    sampled = load_questions("openbookqa:train@100", "test", str(data))
    assert len(sampled) == 100 and sampled == load_questions("openbookqa:train@100", "test", str(data))
    cfg = TrainConfig(task="arc-challenge:train+mmlu:auxiliary_train,dev")
    assert cfg.evaluated() == "arc-challenge+mmlu"
