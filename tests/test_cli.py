"""The command line: the default job, eval, inspect, and one clear line for every bad input."""
import json
import shutil

import pytest
import yaml

from lowmem_graph.cli import main

from conftest import shared_data


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_clean_error(code, err, expected):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowmem-graph: error:"), err
    assert expected in lines[0], err
    assert "Traceback" not in err


@pytest.mark.slow
def test_default_train_job(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "train", "--no-progress")
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("epoch ")][-1].startswith("epoch 3/3")
    assert "host RSS" in out and "validation acc" in out and "95% CI" in out
    (run,) = (tmp_path / "runs").iterdir()
    assert {"config.yaml", "metrics.jsonl", "trainable.safetensors", "curves.png"} <= {p.name for p in run.iterdir()}


def test_eval_reports_interval_and_writes_predictions(short_run, capsys, tmp_path):
    out_file = tmp_path / "preds.jsonl"
    code, out, _ = run_cli(capsys, "eval", str(short_run), "--split", "validation", "--limit", "12",
                           "--out", str(out_file), "--no-progress")
    assert code == 0 and "95% CI" in out and "routing share" in out
    rows = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert len(rows) == 12 and {"id", "label", "prediction", "correct", "probs"} <= set(rows[0])


def test_inspect_paper(capsys):
    code, out, _ = run_cli(capsys, "inspect", "--preset", "paper")
    assert code == 0
    assert "17,577,985" in out and "inject before layer 24/32" in out and "16.457B" in out
    for width in ("2048", "1536", "2304", "3072", "4096"):
        assert width in out


def _graph_file(tmp_path, model):
    spec = yaml.safe_load(open(__import__("lowmem_graph.spec", fromlist=["x"]).preset_path("tiny")))
    spec["nodes"][0]["model"] = model
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("model, expected", [
    ("nobody-here/no-such-model-xyz", "cannot reach the Hugging Face hub for model"),
    ("./no/such/folder", "model path not found"),
])
def test_bad_models_fail_cleanly_and_leave_nothing(tmp_path, capsys, model, expected):
    code, _, err = run_cli(capsys, "train", "--graph", str(_graph_file(tmp_path, model)), "--out",
                           str(tmp_path / "runs"))
    assert_clean_error(code, err, expected)
    assert not list((tmp_path / "runs").glob("*"))        # the run's folder, made first, is gone again


def test_not_a_causal_lm(tmp_path, capsys):
    from transformers import T5Config

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50).save_pretrained(tmp_path / "t5")
    code, _, err = run_cli(capsys, "train", "--graph", str(_graph_file(tmp_path, str(tmp_path / "t5"))))
    assert_clean_error(code, err, "not a causal LM")


def test_bad_yaml(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("nodes: [\n  {name: a\n")
    code, _, err = run_cli(capsys, "inspect", "--graph", str(path))
    assert_clean_error(code, err, str(path))
    with pytest.raises(Exception):
        main(["--debug", "inspect", "--graph", str(path)])   # --debug shows the real traceback


@pytest.mark.parametrize("flags, expected", [
    (["--task", "arc-hard"], "unknown task 'arc-hard'"),
    (["--eval-split", "dev2"], "split"),
])
def test_bad_task_or_split(tmp_path, capsys, flags, expected):
    code, _, err = run_cli(capsys, "train", *flags, "--out", str(tmp_path / "runs"))
    assert_clean_error(code, err, expected)
    assert not list((tmp_path / "runs").glob("*"))


def test_malformed_data_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    source = shared_data() / "arc"
    lines = (source / "ARC-Easy-Train.jsonl").read_text().splitlines()[:5]
    lines[3] = lines[3][:40]
    (data / "ARC-Easy-Train.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(source / "ARC-Easy-Dev.jsonl", data)
    code, _, err = run_cli(capsys, "train", "--data-dir", str(data), "--out", str(tmp_path / "runs"))
    assert_clean_error(code, err, f"{data / 'ARC-Easy-Train.jsonl'}:4")


def test_mismatched_widths_on_eval(short_run, tmp_path, capsys):
    run = tmp_path / "edited"
    shutil.copytree(short_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["latents"][0]["dim"] = 16
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code, _, err = run_cli(capsys, "eval", str(run), "--split", "validation", "--limit", "4")
    assert_clean_error(code, err, "mismatched widths")


def test_existing_run_folder_is_not_overwritten(short_run, capsys):
    code, _, err = run_cli(capsys, "train", "--run-dir", str(short_run))
    assert_clean_error(code, err, "--resume")


def test_a_runs_config_feeds_back_as_one_file_with_every_training_setting(short_run, tmp_path):
    """`train --config RUN/config.yaml` (or --graph) takes the run's graph and all its settings; flags still win;
    a config.yaml of the older form (graph: and train:) loads too."""
    from lowmem_graph.cli import build_parser
    from lowmem_graph.commands import _spec_and_config
    from lowmem_graph.spec import load_preset

    raw = yaml.safe_load((short_run / "config.yaml").read_text())
    raw["train"].update(warmup=0.2, clip=0.5, weight_decay=0.1)
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(raw))
    for flag in ("--config", "--graph"):
        spec, cfg = _spec_and_config(build_parser().parse_args(["train", flag, str(mine), "--lr", "0.01"]))
        assert (cfg.warmup, cfg.clip, cfg.weight_decay, cfg.limit_train, cfg.epochs, cfg.lr) == (0.2, 0.5, 0.1, 16, 1,
                                                                                                  0.01)
        assert spec.latent_dim == 32 and [n.role for n in spec.nodes] == [n.role for n in load_preset("tiny").nodes]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"graph": load_preset("tiny").to_dict(), "train": raw["train"]}))
    spec, cfg = _spec_and_config(build_parser().parse_args(["train", "--config", str(old)]))
    assert cfg.warmup == 0.2 and spec.readers == load_preset("tiny").readers


def test_cuda_out_of_memory_becomes_one_clear_line(tmp_path, capsys, monkeypatch):
    import torch

    from lowmem_graph.train import Trainer

    def oom(self, questions, inputs=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    code, out, err = run_cli(capsys, "train", "--limit-train", "8", "--limit-eval", "8", "--run-dir",
                             str(tmp_path / "run"), "--no-progress")
    assert_clean_error(code, err, "CUDA out of memory")
    assert "--gpu-mem" in err and "--batch-size" in err
    assert not (tmp_path / "run").exists()
    assert f"(its run folder {tmp_path / 'run'} is removed: nothing had run)" in err


def test_resume_after_max_steps_runs_to_the_end(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--limit-train", "16", "--limit-eval", "8", "--epochs", "2", "--no-progress"]
    assert main(["train", "--run-dir", str(run), "--max-steps", "1", *flags]) == 0
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "done:" in out and "after 4 steps" in out
