"""What a long run needs from its tool: no code runs from a file we read, nothing is lost to a kill, no cache is
trusted blindly, and the same seed gives the same numbers on a fresh machine."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowmem_graph import runstate
from lowmem_graph.cli import main
from lowmem_graph.errors import Interrupted, UserError
from lowmem_graph.spec import load_preset
from lowmem_graph.train import TrainConfig, Trainer, create_run_dir, train

SMALL = dict(limit_train=24, limit_eval=8, batch_size=8, epochs=2, lr=3e-3)
QUIET = dict(progress=False, log=lambda *_: None)


def _cfg(**kw):
    return TrainConfig.from_dict({**load_preset("tiny").train, **SMALL, **kw})


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in runstate.read_metrics(run / "metrics.jsonl") if r["kind"] == "step"]


def _weights(run: Path) -> dict:
    return load_file(str(run / "trainable.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(load_preset("tiny"), _cfg(), run, **QUIET)
    return _weights(run)


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- no code from a file we read ---------------------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED']}",))


def test_a_crafted_checkpoint_runs_no_code(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    from lowmem_graph.train import save_config

    save_config(run, load_preset("tiny"), _cfg())
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED", str(marker))
    torch.save({"step": 1, "trainable": {}, "evil": _Payload()}, run / "checkpoint.pt")
    code = main(["train", "--resume", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not load safely" in err
    assert not marker.exists()


def test_an_old_pickled_checkpoint_still_resumes(tmp_path, straight):
    """A run folder of the previous version (checkpoint.pt with NumPy's RNG state inside) resumes safely."""
    spec, run = load_preset("tiny"), tmp_path / "old"
    train(spec, _cfg(max_steps=4), run, **QUIET)
    state = runstate.load_checkpoint(run)
    version, words, gauss = state.rng["json"]["python"]
    kind, keys, pos, has_gauss, cached = state.rng["json"]["numpy"]
    legacy = {"trainable": state.trainable, "optimizer": state.optimizer, "scheduler": state.scheduler,
              "step": state.step, "rng": {"python": (version, tuple(words), gauss),
                                          "numpy": (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached),
                                          "torch": state.rng["tensors"]["rng.torch"]}}
    for link in (run / "checkpoint", run / "trainable.safetensors"):
        link.unlink()
    torch.save(legacy, run / "checkpoint.pt")
    train(spec, _cfg(), run, resume=True, **QUIET)
    _assert_same(straight, _weights(run))


@pytest.mark.parametrize("model_type", ["llama", "evil-arch"])
def test_remote_code_never_runs_unless_a_node_asks(tmp_path, model_type):
    """A model folder whose config names Python of its own: a known architecture loads with the library's own
    code; an unknown one is refused in one line. Either way the folder's code never runs."""
    from transformers import LlamaConfig

    from lowmem_graph.loading import load_config

    folder = tmp_path / "custom"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                vocab_size=64).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type,
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    if model_type == "llama":
        assert type(load_config(str(folder))[0]).__name__ == "LlamaConfig"
    else:
        with pytest.raises(UserError, match="trust_remote_code: true"):
            load_config(str(folder))
    assert not marker.exists()


# ---- nothing lost to a kill ---------------------------------------------------------------------------------------
def _signal_after(monkeypatch, step: int, signum: int):
    """Send `signum` to this process while step `step` is under way, as a scheduler or a Ctrl-C would."""
    real = Trainer.train_step

    def step_then_signal(self, questions, inputs=None):
        out = real(self, questions, inputs)
        if self.step + 1 == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_at_the_step_reached_and_resume_ends_equal(tmp_path, monkeypatch, straight, signum,
                                                                         code):
    spec, run = load_preset("tiny"), tmp_path / "run"
    _signal_after(monkeypatch, 3, signum)
    with pytest.raises(Interrupted) as info:
        train(spec, _cfg(), run, **QUIET)
    assert info.value.code == code
    assert runstate.load_checkpoint(run).step == 3 and _steps(run) == [1, 2, 3]
    monkeypatch.undo()
    train(spec, _cfg(), run, resume=True, **QUIET)
    assert _steps(run) == list(range(1, 7))               # no step twice
    _assert_same(straight, _weights(run))


def test_ctrl_c_during_the_frozen_pass_keeps_a_folder_that_resumes_from_step_0(tmp_path, monkeypatch, straight):
    from lowmem_graph import frozen_pass

    real = frozen_pass.run_frozen_pass

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(frozen_pass, "run_frozen_pass", interrupted)
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="restarts from step 0"):
        train(load_preset("tiny"), _cfg(), run, **QUIET)
    assert (run / "config.yaml").is_file() and not runstate.has_checkpoint(run)
    monkeypatch.setattr(frozen_pass, "run_frozen_pass", real)
    train(load_preset("tiny"), _cfg(), run, resume=True, **QUIET)
    _assert_same(straight, _weights(run))


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_run_that_resumes(tmp_path, straight):
    """A real process killed with SIGKILL while it trains (before or after its first checkpoint, wherever the
    kill lands): `--resume` finishes the run, every step once, the same weights as a run never killed."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "lowmem_graph.cli", "train", "--run-dir", str(run), "--limit-train", "24",
            "--limit-eval", "8", "--batch-size", "8", "--epochs", "2", "--lr", "0.003", "--no-progress"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not _steps(run) and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 9')           # and a line cut in half by the kill
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert _steps(run) == list(range(1, 7))
    _assert_same(straight, _weights(run))


def test_a_crash_inside_a_checkpoint_write_keeps_the_previous_one_whole(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(load_preset("tiny"), _cfg(max_steps=2, checkpoint_every=1), run, **QUIET)
    before = _weights(run)
    real = runstate.save_file
    calls = []

    def crash_on_the_state(tensors, path, metadata=None):
        calls.append(path)
        if path.endswith("state.safetensors"):
            raise OSError(28, "No space left on device", path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(runstate, "save_file", crash_on_the_state)
    trainer = Trainer(load_preset("tiny"), _cfg(), run, **QUIET)
    trainer.load_checkpoint()
    trainer.step = 3
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    trainer.close()
    assert runstate.load_checkpoint(run).step == 2
    _assert_same(before, _weights(run))                  # trainable.safetensors still the step-2 checkpoint's
    assert not [p for p in run.rglob("*.tmp")]


@pytest.mark.parametrize("part", ["state.safetensors", "trainable.safetensors", "state.json"])
def test_a_damaged_checkpoint_is_one_line_not_a_traceback(tmp_path, capsys, part):
    run = tmp_path / "run"
    train(load_preset("tiny"), _cfg(max_steps=2), run, **QUIET)
    path = (run / "checkpoint" / part).resolve()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    code = main(["train", "--resume", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "checkpoint" in err and "Traceback" not in err
    assert "damaged" in err or "unreadable" in err


def test_leftovers_of_killed_writes_are_removed_on_resume(tmp_path):
    run = tmp_path / "run"
    train(load_preset("tiny"), _cfg(max_steps=2), run, **QUIET)
    dead = 2 ** 22 + 12345                                 # above pid_max: no such process
    stale = [run / f".metrics.jsonl.{dead}.abc123.tmp", run / runstate.STORE / f".step-0000009.{dead}.xyz.tmp"]
    stale[0].write_text("half")
    stale[1].mkdir()
    mine = run / f".config.yaml.{os.getpid()}.mine.tmp"      # a live process's temporary is left alone
    mine.write_text("in progress")
    train(load_preset("tiny"), _cfg(), run, resume=True, **QUIET)
    assert not any(p.exists() for p in stale) and mine.exists()


def test_a_folder_another_process_wrote_first_wins(tmp_path):
    """Two processes building the same cached folder (a tiny model, a quantised node): the first rename wins and
    the second drops its copy without an error, whenever the first one lands."""
    from lowmem_graph.files import atomic_dir

    path = tmp_path / "tiny" / "llama-v1"
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text("second")
        path.mkdir()                                      # the other process finishes while this one writes
        (path / "config.json").write_text("first")
    assert (path / "config.json").read_text() == "first" and [p.name for p in path.parent.iterdir()] == ["llama-v1"]


def test_resume_refuses_changed_settings_unless_asked(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_preset("tiny"), _cfg(max_steps=1), run, **QUIET)
    code = main(["train", "--resume", str(run), "--batch-size", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "batch_size 8 -> 4" in err and "--allow-changed-settings" in err
    assert main(["train", "--resume", str(run), "--epochs", "1", "--allow-changed-settings", "--no-progress"]) == 0


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: create_run_dir(tmp_path, "tiny"), range(16)))
    assert len(set(folders)) == 16 and all(f.is_dir() and f.parent == tmp_path for f in folders)
    with pytest.raises(UserError, match="run name"):
        create_run_dir(tmp_path, "../escape")


# ---- no cache trusted blindly -------------------------------------------------------------------------------------
def _cached_entry(tiny_graph, questions, tmp_path):
    from lowmem_graph.cache import PrefixCache
    from lowmem_graph.questions import format_prompt
    from lowmem_graph.frozen_pass import run_frozen_pass

    cache = PrefixCache(tmp_path / "prefix", log=lambda *_: None)
    run_frozen_pass(tiny_graph, [(q.id, format_prompt(q)) for q in questions], cache, 8, progress=False)
    return cache, sorted((tmp_path / "prefix").iterdir())[0]


@pytest.mark.parametrize("damage", ["reordered", "escaping file", "dropped digest"])
def test_a_tampered_manifest_is_rebuilt(tiny_graph, questions, tmp_path, damage):
    cache, entry = _cached_entry(tiny_graph, questions, tmp_path)
    manifest = json.loads((entry / "manifest.json").read_text())
    if damage == "reordered":
        manifest["order"] = manifest["order"][::-1]
    elif damage == "escaping file":
        manifest["shards"][0]["file"] = "../../outside.safetensors"
    else:
        manifest.pop("digest")
    (entry / "manifest.json").write_text(json.dumps(manifest))
    assert cache.load(entry.name) is None and not entry.exists()


def test_a_damaged_quantised_node_is_quantised_again(tmp_path, monkeypatch, capsys):
    import bitsandbytes.functional as bnbf

    from lowmem_graph.nodes import FrozenNode
    from lowmem_graph.spec import NodeSpec

    monkeypatch.setenv("LOWMEM_GRAPH_CACHE", str(tmp_path / "cache"))
    spec = NodeSpec(name="m", model="tiny:llama", role="reader")
    # a copy: a loaded node's tensors are views of the cached file's pages, which the damage below rewrites in place
    reference = [(k, t.clone()) for k, t in FrozenNode.load(spec, "nf4", "cpu", 64).frozen_tensors()]
    (folder,) = (tmp_path / "cache" / "nodes").iterdir()
    quantised = []
    real = bnbf.quantize_4bit
    monkeypatch.setattr(bnbf, "quantize_4bit", lambda *a, **k: quantised.append(1) or real(*a, **k))
    FrozenNode.load(spec, "nf4", "cpu", 64)
    assert not quantised                                   # a whole copy is reused as it is
    weights = folder / "model.safetensors"
    for damage in ("flip", "truncate"):
        data = bytearray(weights.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x01
        else:
            data = data[: len(data) // 3]
        weights.write_bytes(bytes(data))
        node = FrozenNode.load(spec, "nf4", "cpu", 64)
        assert quantised, damage                           # quantised again, no traceback
        quantised.clear()
        assert "damaged" in capsys.readouterr().err
        for (k, a), (_, b) in zip(reference, node.frozen_tensors()):
            assert torch.equal(a, b), (damage, k)


def test_a_local_folder_is_known_by_its_content(tmp_path):
    """New weights of the same size and modification time are new weights."""
    from lowmem_graph.loading import source_identity

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"A" * 1000)
    stamp = weights.stat().st_mtime_ns
    first = source_identity(str(folder), True)
    weights.write_bytes(b"B" * 1000)
    os.utime(weights, ns=(stamp, stamp))
    assert source_identity(str(folder), True) != first
    assert source_identity(str(folder), True) == source_identity(str(folder), True)


# ---- same seed, same numbers --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_fresh_machines_give_the_same_cache_bytes_and_losses(tmp_path, monkeypatch):
    """Everything built from scratch twice (tiny models and tokenizers, quantised nodes, prefix cache): the same
    bytes in every cache shard and the same losses, step by step."""
    results = []
    for machine in ("a", "b"):
        monkeypatch.setenv("LOWMEM_GRAPH_CACHE", str(tmp_path / machine / "cache"))
        run = tmp_path / machine / "run"
        train(load_preset("tiny"), _cfg(epochs=1, limit_train=16), run, **QUIET)
        shards = {p.relative_to(tmp_path / machine / "cache").as_posix(): p.read_bytes()
                  for p in sorted((tmp_path / machine / "cache" / "prefix").rglob("*.safetensors"))}
        results.append(([r["loss"] for r in runstate.read_metrics(run / "metrics.jsonl") if r["kind"] == "step"],
                        shards))
    assert results[0][0] == results[1][0]
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) >= 5
    assert all(results[0][1][k] == results[1][1][k] for k in results[0][1])


def test_a_failed_command_loses_its_folder_one_way(tmp_path, monkeypatch, capsys):
    """One rule for a command's new folder (settings.kept_if_started): a training run interrupted before its first
    checkpoint keeps its folder, from the command line as from `train` (it resumes from step 0, as it says); a
    mistake before anything ran removes it and says so, in train as in align and probe-quant, whose folders hold
    nothing to resume."""
    from lowmem_graph import frozen_pass, probe, ridge

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(frozen_pass, "run_frozen_pass", interrupted)
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--limit-train", "8", "--epochs", "1", "--no-progress"]) == 130
    assert "restarts from step 0" in capsys.readouterr().err and (run / "config.yaml").is_file()
    monkeypatch.undo()

    def mistaken(*args, **kwargs):
        raise UserError("a mistake found late")

    for module, name, argv, why in [
            (ridge, "align_graph", ["align", "--limit", "10"], "nothing in it can be resumed"),
            (probe, "probe_node", ["probe-quant", "--limit", "2"], "nothing in it can be resumed"),
            (frozen_pass, "run_frozen_pass", ["train", "--limit-train", "8", "--epochs", "1"], "nothing had run")]:
        monkeypatch.setattr(module, name, mistaken)
        folder = tmp_path / name
        assert main([*argv, "--run-dir", str(folder), "--no-progress"]) == 2
        assert (f"a mistake found late (its run folder {folder} is removed: {why})"
                in capsys.readouterr().err), name
        assert not folder.exists()
        monkeypatch.undo()


@pytest.mark.parametrize("resumable", [True, False])
def test_a_failed_folder_goes_with_a_reason_that_is_true(tmp_path, capsys, resumable):
    """A command with nothing to resume (align, probe-quant: not `resumable`) may have run when it fails: its
    folder goes whatever it holds, and the message does not say that nothing had run."""
    from lowmem_graph.errors import UserError
    from lowmem_graph.settings import discard_unstarted

    for error in (UserError("a mistake"), KeyboardInterrupt()):
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.yaml").write_text("x: 1\n")
        if not resumable:
            (run / "alignment.json").write_text("{}")      # work that ran
        said = discard_unstarted(run, error, resumable=resumable)
        text = str(said) if isinstance(error, UserError) else capsys.readouterr().err
        why = "nothing had run" if resumable else "nothing in it can be resumed"
        assert not run.exists() and f"{run} " in text and f"removed: {why}" in text
