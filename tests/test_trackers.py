"""--report-to: the metrics, settings and memory plan of a run also go to an experiment tracker, read back here from
the tracker's own files (TensorBoard's event files, mlflow's local store)."""
import json
import sys

import pytest

from lowmem_graph.cli import main
from lowmem_graph.runstate import read_metrics
from lowmem_graph.trackers import scalars

QUICK = ["--epochs", "1", "--limit-train", "8", "--limit-eval", "4", "--batch-size", "4", "--no-progress"]


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_gets_every_metric_the_plan_and_a_resume_once(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard comes with the test extra: pip install '.[test]'")
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--gpu-mem", "1G", "--report-to", "tensorboard", "--max-steps", "1",
                 *QUICK]) == 0
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run / "tensorboard")) as killed:     # a run killed after step 2, before its checkpoint
        killed.add_scalar("step/loss", 99.0, 2)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    events = _events(run / "tensorboard")
    records = read_metrics(run / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["step", "step", "epoch"]
    expected = {}
    for record in records:
        for tag, value in scalars(record).items():
            expected.setdefault(tag, []).append((record["step"], value))
    assert {"step/loss", "step/lr", "step/host_rss_mb", "epoch/eval_acc", "epoch/routing/phi3"} <= expected.keys()
    for tag, values in expected.items():      # each step once: the killed run's step 2 was dropped on resume
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(s, pytest.approx(v, rel=1e-6)) for s, v in values]
    assert events.Scalars("plan/budget_mib")[0].value == 1024 and len(events.Scalars("plan/budget_mib")) == 1
    assert 0 < events.Scalars("plan/train_peak_mib")[0].value < 1024
    texts = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}
    assert len(texts["config/text_summary"]) == 1 and len(texts["memory_plan/text_summary"]) == 1
    assert b"report_to: tensorboard" in texts["config/text_summary"][0].tensor_proto.string_val[0]
    assert b"plan for graph tiny" in texts["memory_plan/text_summary"][0].tensor_proto.string_val[0]


def test_mlflow_gets_the_same_scalars_and_the_settings(short_run, tmp_path, monkeypatch):
    """The reporter a trainer opens, fed the short run's records, into mlflow's local file store."""
    pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install 'lowmem-graph[mlflow]'")
    from mlflow.tracking import MlflowClient

    from lowmem_graph.settings import load_run_config
    from lowmem_graph.trackers import open_reporter

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    spec, cfg = load_run_config(short_run)
    cfg.report_to = "mlflow"
    trainer = type("T", (), {"cfg": cfg, "spec": spec, "run_dir": short_run, "variant": None, "step": 0,
                             "plan": None})
    reporter = open_reporter(trainer)
    records = read_metrics(short_run / "metrics.jsonl")
    for record in records:
        reporter.log(record)
    reporter.close()
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("lowmem-graph").experiment_id])
    assert run.info.run_name == short_run.name and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(cfg.lr) and run.data.params["graph.nodes.0.name"] == spec.nodes[0].name
    for tag in ("step/loss", "epoch/eval_acc", "epoch/eval_ci/1"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)]
        assert sorted(logged) == [(r["step"], scalars(r)[tag]) for r in records if tag in scalars(r)]


def test_wandb_offline_gets_the_settings_and_every_tag(short_run, tmp_path, monkeypatch):
    """wandb's own run, offline; its .wandb log (protobuf records) must carry every tag and value logged."""
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install 'lowmem-graph[wandb]'")
    import shutil

    from lowmem_graph.settings import load_run_config
    from lowmem_graph.trackers import open_reporter

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    spec, cfg = load_run_config(run)
    cfg.report_to = "wandb"
    trainer = type("T", (), {"cfg": cfg, "spec": spec, "run_dir": run, "variant": None, "step": 0, "plan": None})
    reporter = open_reporter(trainer)
    records = read_metrics(run / "metrics.jsonl")
    for record in records:
        reporter.log(record)
    reporter.close()
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert log.name == f"run-{run.name}.wandb"
    data = log.read_bytes()
    for record in records:
        for tag, value in scalars(record).items():
            forms = {json.dumps(value), json.dumps(int(value))} if value == int(value) else {json.dumps(value)}
            assert tag.encode() in data and any(f.encode() in data for f in forms)     # wandb writes 8.0 as 8
    assert b"report_to" in data and b"wandb" in data        # the settings, as wandb's config


@pytest.mark.parametrize("tracker, module", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                             ("mlflow", "mlflow")])
def test_a_missing_tracker_library_is_one_line_and_no_run_folder(tracker, module, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)        # import fails as it does where the extra is not installed
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--report-to", tracker, *QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lowmem-graph: error: --report-to {tracker} needs the {tracker} library: pip "
                              f"install 'lowmem-graph[{tracker}]' (or pip install {tracker})")
    assert "nothing had run" in err[-1] and not run.exists()


def test_scalars_flatten_a_record_under_its_variant():
    record = {"kind": "epoch", "step": 4, "variant": "router", "epoch": 1, "perplexity": {"llama": 3.5},
              "eval_ci": [0.1, 0.2], "flag": True, "note": "text"}
    assert scalars(record) == {"router/epoch/epoch": 1.0, "router/epoch/perplexity/llama": 3.5,
                               "router/epoch/eval_ci/0": 0.1, "router/epoch/eval_ci/1": 0.2}
