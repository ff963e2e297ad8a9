"""The hub both ways: `export RUN --push-to-hub ORG/NAME` and `TrainedGraph("ORG/NAME")` / `predict ORG/NAME`,
against a local folder standing in for the hub (huggingface_hub's upload and download replaced by copies; never
the network)."""
import json
import shutil

import huggingface_hub
import pytest
from conftest import hub_response
from huggingface_hub.repocard import metadata_load

from lowmem_graph import TrainedGraph
from lowmem_graph.cli import main
from lowmem_graph.errors import UserError

QUESTION = [{"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"]}]
FILES = {"config.yaml", "trainable.safetensors", "metrics.jsonl", "README.md", "export.json"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A folder per repository; every call the hub library got, with its arguments."""
    root, calls = tmp_path / "hub", []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        (root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, kwargs))
        assert kwargs["delete_patterns"] == "*"         # the repository holds this export alone
        shutil.rmtree(root / repo_id)
        shutil.copytree(folder_path, root / repo_id)
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message="",
                                          commit_description="", oid="1")

    def snapshot_download(repo_id, local_dir=None, **kwargs):
        calls.append(("snapshot_download", repo_id, kwargs))
        if not (root / repo_id).is_dir():
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found", response=hub_response(404))
        shutil.copytree(root / repo_id, local_dir, dirs_exist_ok=True)
        return local_dir

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return root, calls


def test_push_then_load_by_hub_id_with_the_checksum(short_run, hub, tmp_path, capsys):
    root, calls = hub
    assert main(["export", str(short_run), "--push-to-hub", "me/tiny-graph", "--private", "--license", "mit"]) == 0
    out = capsys.readouterr().out
    assert "pushed" in out and "https://huggingface.co/me/tiny-graph" in out and "TrainedGraph('me/tiny-graph')" in out
    assert [c[:2] for c in calls] == [("create_repo", "me/tiny-graph"), ("upload_folder", "me/tiny-graph")]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert {p.name for p in (root / "me/tiny-graph").iterdir()} == FILES
    meta = metadata_load(root / "me/tiny-graph" / "README.md")          # the hub library's own reading
    assert meta["library_name"] == "lowmem-graph" and meta["license"] == "mit"
    assert meta["datasets"] == ["allenai/ai2_arc"] and "lowmem-graph" in meta["tags"]
    assert "base_model" not in meta                     # the tiny nodes are built locally, not hub models
    assert 'TrainedGraph("me/tiny-graph")' in (root / "me/tiny-graph" / "README.md").read_text()

    assert TrainedGraph("me/tiny-graph").predict(QUESTION) == TrainedGraph(short_run).predict(QUESTION)
    assert main(["predict", "me/tiny-graph", "--question", QUESTION[0]["question"], "--choices",
                 *QUESTION[0]["choices"], "--out", str(tmp_path / "p.jsonl"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "p.jsonl").read_text())["probs"] == TrainedGraph(short_run).predict(QUESTION)[0][
        "probs"]
    assert main(["eval", "me/tiny-graph", "--split", "validation", "--limit", "4", "--out", str(tmp_path / "e.jsonl"),
                 "--no-progress"]) == 0
    assert main(["eval", str(short_run), "--split", "validation", "--limit", "4", "--out", str(tmp_path / "l.jsonl"),
                 "--no-progress"]) == 0
    assert (tmp_path / "e.jsonl").read_text() == (tmp_path / "l.jsonl").read_text()

    weights = root / "me/tiny-graph" / "trainable.safetensors"          # changed on the hub after the export
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the SHA-256 in export.json"):
        TrainedGraph("me/tiny-graph")


def test_push_and_a_folder_both(short_run, hub, tmp_path):
    root, _ = hub
    assert main(["export", str(short_run), str(tmp_path / "local"), "--push-to-hub", "me/both"]) == 0
    assert {p.name for p in (tmp_path / "local").iterdir()} == FILES
    assert (tmp_path / "local" / "README.md").read_text() == (root / "me/both" / "README.md").read_text()


def test_card_header_names_hub_models_and_data_sets():
    from lowmem_graph.hub import card_header
    from lowmem_graph.settings import TrainConfig
    from lowmem_graph.spec import load_preset

    spec = load_preset("paper")
    header = card_header(spec, TrainConfig(task="arc-easy+openbookqa+hf:org/data/main"))
    assert header.startswith("---\n") and header.endswith("---\n\n")
    import yaml

    meta = yaml.safe_load(header.strip().strip("-"))
    assert meta["base_model"] == [n.model for n in spec.nodes]
    assert meta["datasets"] == ["allenai/ai2_arc", "allenai/openbookqa", "org/data"]
    assert meta["license"] == "other" and meta["pipeline_tag"] == "multiple-choice"


@pytest.mark.parametrize("argv, said", [
    (["export", "RUN"], "give the folder to export into, --push-to-hub ORG/NAME, or both"),
    (["export", "RUN", "--push-to-hub", "no-owner"], "expected a hub repository id ORG/NAME"),
    (["predict", "me/absent", "--question", "q", "--choices", "a", "b"], "does not exist on the Hugging Face hub"),
])
def test_hub_mistakes_are_one_line(short_run, hub, argv, said, capsys):
    argv = [str(short_run) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0]
    assert not (hub[0] / "no-owner").exists()


def test_a_hub_repository_that_is_no_export_is_refused(hub):
    root, _ = hub
    (root / "me/model").mkdir(parents=True)
    (root / "me/model" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="me/model on the hub is not a lowmem-graph export"):
        TrainedGraph("me/model")


def test_offline_a_hub_graph_is_one_line_at_once(monkeypatch, capsys):
    """No stand-in: the real snapshot_download in offline mode (the tests' setting), nothing cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["predict", "someone/graph", "--question", "q", "--choices", "a", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the Hugging Face hub for graph 'someone/graph'" in err[0]


def test_a_mistyped_run_folder_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    from lowmem_graph.hub import is_repo_id

    monkeypatch.chdir(tmp_path)
    assert is_repo_id("runs/tiny-20261205-054801")          # no runs/ here: it could be a repository
    (tmp_path / "runs").mkdir()
    assert not is_repo_id("runs/tiny-20261205-054801")      # runs/ exists: a missing run folder, not a download
    assert is_repo_id("openai-community/gpt2") and not is_repo_id("runs")
