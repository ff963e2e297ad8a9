"""Nothing trusted that was not checked (issue 27): links never lead a read or a write out of a run folder or a
cache; every cache entry knows the key it was stored under; a run folder's weights and checkpoints are checked on
every load; a full disk or a SIGTERM leaves no temporary and no half folder."""
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from lowmem_graph import runstate
from lowmem_graph.cli import main
from lowmem_graph.errors import UserError
from lowmem_graph.tiny import cache_root


def _copy(run, tmp_path, cache=None):
    """A copy of a trained run folder (links kept as links), its prefix cache moved to `cache` if given."""
    import yaml

    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    if cache is not None:
        config = yaml.safe_load((copy / "config.yaml").read_text())
        config["train"]["cache_dir"] = str(cache)
        (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


def _one_line(capsys, code, expected=2):
    err = capsys.readouterr().err
    assert code == expected and err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    return err


def _temporaries(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".parts")]


# ---- 0. links never lead out ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".checkpoints", "metrics.jsonl", "wandb"])
def test_a_resume_neither_deletes_nor_writes_through_a_link_out(short_run, tmp_path, capsys, name):
    run = _copy(short_run, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {outside / "step-0000001" / "keep.txt": "another run's checkpoint",
               outside / f".x.{2 ** 22 + 7}.dead.tmp": "looks like a stale temporary",
               outside / "log.jsonl": '{"kind": "step", "step": 99}\n'}
    for path, text in victims.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    if name == ".checkpoints":
        shutil.copytree(run / name, outside, dirs_exist_ok=True)
        shutil.rmtree(run / name)
        (run / name).symlink_to(outside)
    elif name == "wandb":       # what wandb writes inside its folder may link out, the folder itself may not
        (run / name).symlink_to(outside)
    else:
        (run / name).unlink()
        (run / name).symlink_to(outside / "log.jsonl")
    err = _one_line(capsys, main(["train", "--resume", str(run), "--no-progress"]))
    assert name in err and "outside" in err
    assert all(path.read_text() == text for path, text in victims.items())
    with pytest.raises(UserError, match="outside"):          # the API refuses before any write as well
        runstate.save_checkpoint(run, 7, {"w": torch.zeros(2)}, {"state": {}, "param_groups": []}, {})
    assert all(path.read_text() == text for path, text in victims.items())


def test_a_prefix_cache_entry_that_is_a_link_is_refused(tiny_graph, questions, tmp_path):
    from lowmem_graph.cache import PrefixCache
    from lowmem_graph.questions import format_prompt
    from lowmem_graph.frozen_pass import run_frozen_pass

    items = [(q.id, format_prompt(q)) for q in questions[:4]]
    cache = PrefixCache(tmp_path / "prefix", log=lambda *_: None)
    run_frozen_pass(tiny_graph, items, cache, 8, progress=False)
    entry = sorted((tmp_path / "prefix").iterdir())[0]
    elsewhere = tmp_path / "elsewhere"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    with pytest.raises(UserError, match="is a link"):
        run_frozen_pass(tiny_graph, items, cache, 8, progress=False)
    assert entry.is_symlink() and sorted(p.name for p in elsewhere.iterdir()) == before     # nothing deleted


# ---- 1. every cache entry knows its key ----------------------------------------------------------------------------
def test_swapped_prefix_cache_entries_are_rebuilt(tiny_graph, questions, tmp_path):
    from lowmem_graph.cache import PrefixCache
    from lowmem_graph.questions import format_prompt
    from lowmem_graph.frozen_pass import run_frozen_pass

    items = [(q.id, format_prompt(q)) for q in questions[:6]]
    messages = []
    cache = PrefixCache(tmp_path, log=messages.append)
    first = run_frozen_pass(tiny_graph, items, cache, 8, progress=False)
    reference = {k: torch.cat([e.row(i) for i in range(len(items))]) for k, e in first.entries.items()}
    a, b = [e.folder for e in list(first.entries.values())[:2]]
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    again = run_frozen_pass(tiny_graph, items, cache, 8, progress=False)
    assert sorted(m.split()[3] for m in messages) == sorted([a.name, b.name])
    assert all("another entry's" in m for m in messages)
    for k, e in again.entries.items():
        assert torch.equal(torch.cat([e.row(i) for i in range(len(items))]), reference[k]), k


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache root of this test's own, holding a copy of the session's tiny models (built already)."""
    from lowmem_graph.tiny import tiny_path

    for arch in ("llama", "qwen2"):
        tiny_path(arch)
    root = tmp_path / "cache"
    shutil.copytree(cache_root() / "tiny", root / "tiny")
    monkeypatch.setenv("LOWMEM_GRAPH_CACHE", str(root))
    return root


def test_swapped_quantised_nodes_are_quantised_again(own_cache, capsys):
    from lowmem_graph.nodes import FrozenNode
    from lowmem_graph.spec import NodeSpec

    specs = [NodeSpec(name=a, model=f"tiny:{a}", role="reader") for a in ("llama", "qwen2")]
    reference = [dict(FrozenNode.load(s, "nf4", "cpu", 64).frozen_tensors()) for s in specs]
    a, b = sorted((own_cache / "nodes").iterdir())
    a.rename(own_cache / "swap")
    b.rename(a)
    (own_cache / "swap").rename(b)
    capsys.readouterr()
    for spec, tensors in zip(specs, reference):
        again = dict(FrozenNode.load(spec, "nf4", "cpu", 64).frozen_tensors())
        assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    err = capsys.readouterr().err
    assert err.count("not this node's: quantising the node again") == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "no config", "swapped"])
def test_a_damaged_tiny_model_is_built_again(own_cache, capsys, damage):
    from lowmem_graph.tiny import tiny_path

    folder = tiny_path("llama")
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "no config":
        (folder / "config.json").unlink()
    else:
        other = tiny_path("qwen2")
        folder.rename(own_cache / "swap")
        other.rename(folder)
        (own_cache / "swap").rename(other)
    capsys.readouterr()
    assert tiny_path("llama") == folder
    assert "tiny model" in capsys.readouterr().err
    assert weights.read_bytes() == original                 # the same deterministic build
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


# ---- 2. a run folder cannot lie --------------------------------------------------------------------------------------
def _flip_weights(run):
    path = (run / "trainable.safetensors").resolve()
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x10                          # inside the tensors, the header intact
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_flipped_weights_are_refused_by_eval_predict_and_export(short_run, tmp_path, capsys, command):
    run = _copy(short_run, tmp_path)
    _flip_weights(run)
    argv = {"eval": ["eval", str(run), "--limit", "4", "--no-progress"],
            "predict": ["predict", str(run), "--question", "Q?", "--choices", "a", "b", "--no-progress"],
            "export": ["export", str(run), str(tmp_path / "exported")]}[command]
    err = _one_line(capsys, main(argv))
    assert "trainable.safetensors is damaged" in err
    assert not (tmp_path / "exported").exists()             # no SHA-256 written for damaged weights


def test_a_lost_checkpoint_link_resumes_from_the_newest_whole_checkpoint(short_run, tmp_path, capsys):
    run = _copy(short_run, tmp_path)
    (step,) = [p.name for p in (run / runstate.STORE).iterdir()]
    expected = runstate.load_checkpoint(run)
    (run / runstate.LINK).unlink()
    capsys.readouterr()
    state = runstate.load_checkpoint(run)
    assert state is not None and state.step == expected.step == int(step.split("-")[1])
    assert all(torch.equal(state.trainable[k], expected.trainable[k]) for k in expected.trainable)
    assert f"no checkpoint link: using .checkpoints/{step}" in capsys.readouterr().err
    weights = runstate.trainable_weights(run)              # eval and predict find the weights too
    assert all(torch.equal(weights[k], expected.trainable[k]) for k in weights)
    assert runstate.has_checkpoint(run)


def _rewrite_state(run, change):
    """A checkpoint crafted consistently: state.json changed, its digest and the files' SHA-256 made to match."""
    from lowmem_graph.files import file_sha256

    folder = (run / runstate.LINK).resolve()
    state = json.loads((folder / "state.json").read_text())
    state.pop("digest")
    change(state, folder)
    state["sha256"] = {f: file_sha256(folder / f) for f in state["sha256"]}
    (folder / "state.json").write_text(json.dumps({**state, "digest": runstate._digest(state)}))


@pytest.mark.parametrize("step", ["2", -1, True, 1.5])
def test_a_checkpoint_whose_step_is_not_a_count_is_refused(short_run, tmp_path, step):
    run = _copy(short_run, tmp_path)
    _rewrite_state(run, lambda state, folder: state.update(step=step))
    with pytest.raises(UserError, match=r"step .* is not a count of steps"):
        runstate.load_checkpoint(run)


def test_a_checkpoint_with_a_misshapen_optimizer_state_is_refused(short_run, tmp_path, capsys):
    from safetensors.torch import save_file

    def misshape(state, folder):
        tensors = load_file(str(folder / "state.safetensors"))
        key = next(k for k in tensors if k.endswith(".exp_avg") and tensors[k].dim() == 2)
        tensors[key] = tensors[key][:, :-1].contiguous()
        save_file(tensors, str(folder / "state.safetensors"))

    run = _copy(short_run, tmp_path)
    _rewrite_state(run, misshape)
    err = _one_line(capsys, main(["train", "--resume", str(run), "--no-progress"]))
    assert "exp_avg" in err and "shape" in err


# ---- 8. a full disk, a SIGTERM: no temporary, no half folder ---------------------------------------------------------
def _full_disk(monkeypatch):
    """safetensors as it fails on a full disk (measured on a 1 MiB tmpfs: this error, no OSError)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def test_a_full_disk_under_the_prefix_cache_is_one_line_and_leaves_no_temporary(short_run, tmp_path, capsys,
                                                                                  monkeypatch):
    run = _copy(short_run, tmp_path, cache=tmp_path / "cache")
    _full_disk(monkeypatch)
    err = _one_line(capsys, main(["eval", str(run), "--limit", "4", "--no-progress"]))
    assert "No space left on device (the disk is full)" in err
    assert not _temporaries(tmp_path / "cache")


def test_a_full_disk_at_the_config_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    import errno

    from lowmem_graph import train as training

    def full(run_dir, *args):
        (run_dir / ".config.yaml.1.x.tmp").write_text("half")      # what a real atomic write may have begun
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "config.yaml"))

    monkeypatch.setattr(training, "save_config", full)
    code = main(["train", "--out", str(tmp_path / "runs"), "--limit-train", "8", "--epochs", "1", "--no-progress"])
    _one_line(capsys, code)
    assert list((tmp_path / "runs").iterdir()) == []


def _sigterm_inside(monkeypatch, module, name):
    """Call `module.name` as usual, then receive SIGTERM there, as from a job scheduler; with no handler installed
    that would kill the process on the spot (its temporaries left), so that is refused first."""
    real = getattr(module, name)

    def then_sigterm(*args, **kwargs):
        out = real(*args, **kwargs)
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "SIGTERM would kill it mid-write"
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(module, name, then_sigterm)


def test_sigterm_during_eval_leaves_no_temporary_in_the_cache(short_run, tmp_path, capsys, monkeypatch):
    from lowmem_graph import cache

    run = _copy(short_run, tmp_path, cache=tmp_path / "cache")
    _sigterm_inside(monkeypatch, cache, "save_file")            # a shard written, the entry not yet whole
    code = main(["eval", str(run), "--limit", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 143 and "Traceback" not in err, err[-2000:]
    assert not _temporaries(tmp_path / "cache") and not list((tmp_path / "cache").glob("*/manifest.json"))


def test_sigterm_during_align_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    from lowmem_graph import ridge

    _sigterm_inside(monkeypatch, ridge, "pooled_states")
    code = main(["align", "--limit", "10", "--out", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 143 and "Traceback" not in err, err[-2000:]
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("variant, command", [("coupled", "eval"), ("router", "eval"), ("coupled", "init-from")])
def test_flipped_lm_weights_are_refused(lm_run, tmp_path, capsys, variant, command):
    """An lm run's weights-<variant>.safetensors are checked as a checkpoint's are: against the SHA-256 its
    lm-results.json recorded when they were written (an older run's, which recorded none, is refused too)."""
    from pathlib import Path

    run = _copy(lm_run, tmp_path)
    weights = run / f"weights-{variant}.safetensors"
    argv = {"eval": ["eval", str(run), "--limit", "2", "--no-progress"],
            "init-from": ["train", "--graph", str(Path(__file__).parents[1] / "examples" / "residual_coupling.yaml"),
                          "--init-from", str(run), "--run-dir", str(tmp_path / "grown"), "--limit-train", "8",
                          "--epochs", "1", "--no-progress"]}[command]
    original = weights.read_bytes()
    data = bytearray(original)
    data[len(data) - 100] ^= 0x10                          # inside the tensors, the header intact
    weights.write_bytes(bytes(data))
    assert f"weights-{variant}.safetensors is damaged" in _one_line(capsys, main(argv))
    weights.write_bytes(original)
    results = json.loads((run / "lm-results.json").read_text())
    del results[variant]["sha256"]
    (run / "lm-results.json").write_text(json.dumps(results))
    assert "records no SHA-256 for it" in _one_line(capsys, main(argv))
    assert not (tmp_path / "grown").exists()
