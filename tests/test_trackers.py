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


def _trainer(short_run, run, tracker: str, step: int = 0):
    """What open_reporter reads of a trainer, for a copy of the short run at `run` (made on first use)."""
    import shutil

    from lowmem_graph.settings import load_run_config

    if not run.exists():
        shutil.copytree(short_run, run)
    spec, cfg = load_run_config(run)
    cfg.report_to = tracker
    return type("T", (), {"cfg": cfg, "spec": spec, "run_dir": run, "variant": None, "step": step, "plan": None})


def _offline(tracker, tmp_path, monkeypatch):
    pytest.importorskip(tracker, reason=f"{tracker} is an optional extra: pip install 'lowmem-graph[{tracker}]'")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_mlflow_gets_the_same_scalars_and_the_settings(short_run, tmp_path, monkeypatch):
    """The reporter a trainer opens, fed the short run's records, into mlflow's local file store."""
    _offline("mlflow", tmp_path, monkeypatch)
    from mlflow.tracking import MlflowClient

    from lowmem_graph.trackers import open_reporter

    trainer = _trainer(short_run, tmp_path / "short", "mlflow")
    cfg, spec = trainer.cfg, trainer.spec
    reporter = open_reporter(trainer)
    records = read_metrics(short_run / "metrics.jsonl")
    for record in records:
        reporter.log(record)
    reporter.close()
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("lowmem-graph").experiment_id])
    assert run.info.run_name == "short" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(cfg.lr) and run.data.params["graph.nodes.0.name"] == spec.nodes[0].name
    for tag in ("step/loss", "epoch/eval_acc", "epoch/eval_ci/1"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)]
        assert sorted(logged) == [(r["step"], scalars(r)[tag]) for r in records if tag in scalars(r)]


def test_wandb_offline_gets_the_settings_and_every_tag(short_run, tmp_path, monkeypatch):
    """wandb's own run, offline; its .wandb log (protobuf records) must carry every tag and value logged."""
    _offline("wandb", tmp_path, monkeypatch)
    from lowmem_graph.trackers import IDS, open_reporter

    run = tmp_path / "run"
    reporter = open_reporter(_trainer(short_run, run, "wandb"))
    records = read_metrics(run / "metrics.jsonl")
    for record in records:
        reporter.log(record)
    reporter.close()
    import wandb

    wandb.teardown()        # finish() can return before wandb's service has flushed the offline log; this waits
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert log.name == f"run-{json.loads((run / IDS).read_text())['wandb']['run']}.wandb"
    data = log.read_bytes()
    for record in records:
        for tag, value in scalars(record).items():
            forms = {json.dumps(value), json.dumps(int(value))} if value == int(value) else {json.dumps(value)}
            assert tag.encode() in data and any(f.encode() in data for f in forms)     # wandb writes 8.0 as 8
    assert b"report_to" in data and b"wandb" in data        # the settings, as wandb's config


def test_wandb_offline_through_training_and_a_resume(tmp_path, monkeypatch):
    """A run reporting to wandb checkpoints and resumes, into the same wandb run, with wandb's folder in the run
    folder (its logs link to wandb's cache, outside it: refused before at the first checkpoint)."""
    _offline("wandb", tmp_path, monkeypatch)
    from lowmem_graph.trackers import IDS

    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--report-to", "wandb", "--max-steps", "1", *QUICK]) == 0
    assert any(p.is_symlink() and not p.resolve().is_relative_to(run) for p in (run / "wandb").rglob("*"))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    run_id = json.loads((run / IDS).read_text())["wandb"]["run"]
    logs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [p.name for p in logs] == [f"run-{run_id}.wandb"] * 2
    assert [r["kind"] for r in read_metrics(run / "metrics.jsonl")] == ["step", "step", "epoch"]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_run_belongs_to_its_run_folder_and_a_resume_continues_it(tracker, short_run, tmp_path,
                                                                           monkeypatch):
    """Two run folders of one name (two machines, a folder made again) are two tracker runs in one project; a
    resume continues its folder's own. The short run's records: the first step's, then a resume's."""
    _offline(tracker, tmp_path, monkeypatch)
    from lowmem_graph.trackers import IDS, open_reporter

    records = read_metrics(short_run / "metrics.jsonl")
    first, then = records[:1], records[1:]
    assert first and then
    for run, step, part in ((tmp_path / "a" / "run", 0, first), (tmp_path / "b" / "run", 0, records),
                            (tmp_path / "a" / "run", first[-1]["step"], then)):
        reporter = open_reporter(_trainer(short_run, run, tracker, step))
        for record in part:
            reporter.log(record)
        reporter.close()
    ids = [json.loads((tmp_path / f / "run" / IDS).read_text())[tracker]["run"] for f in "ab"]
    assert ids[0] != ids[1]
    if tracker == "wandb":          # offline, each start is a folder offline-run-TIME-ID: two for a, one for b
        for f, run_id, starts in (("a", ids[0], 2), ("b", ids[1], 1)):
            logs = sorted((tmp_path / f / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
            assert [p.name for p in logs] == [f"run-{run_id}.wandb"] * starts
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("lowmem-graph").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(ids)
    for r in runs:      # a's run holds its first step and what the resume logged: the same records as b's
        assert r.info.run_name == "run" and r.info.status == "FINISHED"
        logged = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "step/loss"))
        assert logged == [(x["step"], x["loss"]) for x in records if x["kind"] == "step"]


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


def test_a_run_ids_file_damaged_is_one_clear_error(tmp_path):
    """RUN/tracker-runs.json, damaged every way a file can be here: one UserError naming it, never a traceback or
    a silently new tracker run."""
    from lowmem_graph.errors import UserError
    from lowmem_graph.trackers import IDS, RunIds

    ids = RunIds(tmp_path, "mlflow", None)
    ids.put("abc")
    assert RunIds(tmp_path, "mlflow", None).get() == "abc" and RunIds(tmp_path, "wandb", None).get() is None
    for damaged in (b"", b"{", b"\xff\xfe", b"[]", b'"x"', b'{"mlflow": "abc"}', b'{"mlflow": null}'):
        (tmp_path / IDS).write_bytes(damaged)
        with pytest.raises(UserError, match="damaged"):
            ids.get()


def test_mlflow_resumes_or_starts_only_where_its_store_says_so(short_run, tmp_path, monkeypatch):
    """A kept run id the tracking store does not have starts a new run (and is replaced); any other failure of
    the store (an outage) is raised, and the kept id is left as it was."""
    _offline("mlflow", tmp_path, monkeypatch)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lowmem_graph.trackers import IDS, RunIds, open_reporter

    run = tmp_path / "run"
    open_reporter(_trainer(short_run, run, "mlflow")).close()
    first = RunIds(run, "mlflow", None).get()
    RunIds(run, "mlflow", None).put("0123456789abcdef0123456789abcdef")      # not in this store
    open_reporter(_trainer(short_run, run, "mlflow", 1)).close()
    made = RunIds(run, "mlflow", None).get()
    assert made not in (first, "0123456789abcdef0123456789abcdef") and MlflowClient().get_run(made)

    def outage(self, run_id):
        raise MlflowException("connection refused", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient, "get_run", outage)
    with pytest.raises(MlflowException):
        open_reporter(_trainer(short_run, run, "mlflow", 1))
    assert json.loads((run / IDS).read_text())["mlflow"]["run"] == made
