"""The command line behaves like the tools people know: help on every flag, --version, --debug anywhere, sizes with
units, output folders that never collide, a cache one can see and clear, runs that say what they do."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hub_response

from lowmem_graph import __version__
from lowmem_graph.cli import build_parser, main, quiet_warnings
from lowmem_graph.commands import _run_folder


def _commands():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_flag_of_every_command_has_help_and_names_are_alike():
    for name, parser in _commands().items():
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):       # flags and positionals (run_dir) alike
                assert action.help, (name, action.option_strings or action.dest)
        flags = {s for a in parser._actions for s in a.option_strings}
        assert not flags & {"--batch", "--seq"} or {"--batch-size", "--seq-len"} <= flags, name   # aliases only
        assert "--limit_train" not in flags and "--rundir" not in flags
    from lowmem_graph.spec import PRESETS
    assert "{" + ",".join(PRESETS) + "}" in _commands()["train"].format_help()        # every preset offered


def test_version_and_debug_after_the_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lowmem-graph {__version__}"
    assert build_parser().parse_args(["inspect", "--debug"]).debug is True
    assert build_parser().parse_args(["--debug", "inspect"]).debug is True
    assert build_parser().parse_args(["inspect"]).debug is False
    with pytest.raises(Exception, match="no GPU|memory size"):       # --debug after the command: the traceback
        main(["plan", "--gpu-mem", "lots", "--debug"])


def test_help_and_version_import_no_torch():
    """`--help` and `--version` stay quick: building the parser and printing either imports neither torch, nor
    transformers, nor bitsandbytes (bitsandbytes alone costs seconds: it compiles at import)."""
    heavy = ("torch", "transformers", "bitsandbytes")
    code = ("import sys\nfrom lowmem_graph.cli import build_parser\nparser = build_parser()\n"
            "for argv in ([sys.argv[1]], [sys.argv[1], 'train', '--help'], [sys.argv[1], 'reproduce', '--help']):\n"
            "    try:\n        parser.parse_args(argv[1:])\n    except SystemExit:\n        pass\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    for flag in ("--help", "--version"):
        out = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-300:]


def test_the_command_has_openmp_threads_sleep_while_they_wait(tmp_path):
    """Set before torch loads (spinning threads made scoring 50x slower on a busy machine); a user's choice stays."""
    code = ("import os, sys\nfrom lowmem_graph.cli import main\nmain(['cache', '--cache-dir', sys.argv[1]])\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                             check=True)
        assert out.stdout.strip().splitlines()[-1] == expected


def test_the_command_hides_the_libraries_warnings_but_not_ours():
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        quiet_warnings()
        for module in ("transformers.modeling_utils", "lowmem_graph.memory.stream", "lowmem_graph", "lowmem_graphs"):
            warnings.warn_explicit(f"from {module}", RuntimeWarning, "x.py", 1, module=module)
    assert [str(w.message) for w in seen] == ["from lowmem_graph.memory.stream", "from lowmem_graph"]


def test_python_m_from_the_checkout_does_not_offer_our_kernels_folder_as_the_kernels_hub():
    """`python -m lowmem_graph` run from a checkout has the root first on sys.path; its kernels/ must not answer
    bitsandbytes' and transformers' `import kernels`."""
    root = Path(__file__).resolve().parents[1]
    code = ("import lowmem_graph.cli as cli\n"
            "def main():\n    try:\n        import kernels\n        print(kernels.__file__)\n"
            "    except ModuleNotFoundError:\n        print('no kernels hub')\n"
            "cli.main = main\n"
            "import lowmem_graph.__main__")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert str(root / "kernels") not in out.stdout


def test_a_memory_size_without_a_unit_is_refused(capsys):
    assert main(["plan", "--gpu-mem", "24"]) == 2
    err = capsys.readouterr().err
    assert "has no unit, so it would be 24 bytes: write 24G" in err and err.count("\n") == 1


def test_default_output_folders_never_collide(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), run_dir=None)
    first, second = _run_folder(args, "baselines-tiny"), _run_folder(args, "baselines-tiny")
    assert first != second and first.is_dir() and second.is_dir()


def test_reproduce_takes_gpu_mem_batch_size_and_set(monkeypatch, tmp_path):
    from lowmem_graph import reproduce

    seen = {}
    monkeypatch.setattr(reproduce, "reproduce", lambda spec, cfg, *a, **k: seen.update(spec=spec, cfg=cfg) or "x")
    assert main(["reproduce", "--preset", "tiny", "--gpu-mem", "6G", "--batch-size", "4", "--set", "latent_dim=32",
                 "--out", str(tmp_path)]) == 0
    assert seen["cfg"].gpu_mem == "6G" and seen["cfg"].batch_size == 4 and seen["spec"].latent_dim == 32


def test_the_cache_is_listed_and_cleared(tmp_path, capsys):
    entry = tmp_path / "prefix" / "0123abcd"
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text(json.dumps({"info": {"node": "phi3", "model": "tiny:phi3"},
                                                     "order": ["q1", "q2"], "shards": []}))
    (entry / "shard-0.safetensors").write_bytes(b"x" * 3000)
    (tmp_path / "nodes" / "m-nf4-1").mkdir(parents=True)
    (tmp_path / "nodes" / "m-nf4-1" / "model.safetensors").write_bytes(b"y" * 5000)
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prefix/  1 entries" in out and "phi3 (tiny:phi3): 2 questions  [0123abcd]" in out
    assert "nodes/  1 entries" in out and "m-nf4-1" in out
    assert main(["cache", "--cache-dir", str(tmp_path), "--clear", "prefix"]) == 0
    assert "1 entries" in capsys.readouterr().out
    assert not any((tmp_path / "prefix").iterdir()) and (tmp_path / "nodes" / "m-nf4-1").is_dir()


def test_a_run_says_what_it_does_and_logs_lines_without_a_terminal(tmp_path):
    """Output to a pipe (a log file, a scheduler): the device, the data, the folders, then progress lines."""
    done = subprocess.run([sys.executable, "-m", "lowmem_graph", "train", "--epochs", "1", "--limit-train", "20",
                           "--limit-eval", "4", "--batch-size", "2", "--gpu-mem", "1G", "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "device: cpu (no GPU found, running on CPU; --gpu-mem 1G is planned as on a GPU)" in out
    assert "data: 20 training questions (arc-easy, train), 4 evaluated" in out
    assert "10 steps per epoch of 2, 1 epoch\n" in out
    assert f"run folder: {tmp_path / 'run'}" in out and "prefix cache: " in out
    steps = [line for line in out.splitlines() if line.startswith("epoch 1/1 step ")]
    assert [line.split()[3] for line in steps] == [f"{i}/10" for i in range(1, 11)], steps
    for phase in ("caching llama batch ", "caching mistral batch ", "eval batch "):     # the frozen pass, evaluation
        assert any(line.startswith(phase) and "s left" in line for line in done.stderr.splitlines()), phase


def _mine(folder, name, n=6):
    row = {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"], "answer": "B"}
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({**row, "id": f"{name}-{i}"}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("argv, words", [
    (["--task", "arc-easy:test"], "training on a test split (arc-easy:test) would contaminate"),
    (["--task", "arc-easy", "--train-split", "test"], "training on a test split (arc-easy:test)"),
    (["--task", "{d}/ARC-Easy-Test.jsonl", "--eval-task", "{d}/dev.jsonl"], "training on a test split"),
    (["--task", "{d}/mine.jsonl"], "is one file, with no splits: give the questions to evaluate on with --eval-task"),
    (["--task", "arc-easy", "--limit-train", "8", "--limit-eval", "8", "--eval-split", "train"],
     "every question of arc-easy train is also a training question: evaluate on another split"),
])
def test_contaminating_or_ambiguous_training_data_is_refused(tmp_path, capsys, argv, words):
    for name in ("ARC-Easy-Test.jsonl", "dev.jsonl", "mine.jsonl"):
        _mine(tmp_path, name)
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    assert main(["train", *argv, "--out", str(tmp_path / "runs"), "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_training_on_your_own_files_and_a_test_split_when_asked(tmp_path, capsys):
    train_file, dev_file = _mine(tmp_path, "mine.jsonl", 8), _mine(tmp_path, "mine-dev.jsonl", 4)
    assert main(["train", "--task", str(train_file), "--eval-task", str(dev_file), "--epochs", "1",
                 "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "data: 8 training questions" in capsys.readouterr().out
    assert main(["train", "--task", "arc-easy:test", "--allow-test-training", "--limit-train", "8", "--limit-eval",
                 "4", "--epochs", "1", "--run-dir", str(tmp_path / "run2"), "--no-progress"]) == 0


def test_every_node_is_checked_before_any_model_loads(monkeypatch):
    """Gated and missing models are all named at once, before the first download and quantisation."""
    import transformers.utils.hub as hub
    from huggingface_hub.errors import GatedRepoError

    from lowmem_graph import graph
    from lowmem_graph.ablate import apply_changes
    from lowmem_graph.errors import UserError
    from lowmem_graph.spec import load_preset

    monkeypatch.setattr(hub, "is_offline_mode", lambda: False)

    def fail(*args, **kwargs):
        raise GatedRepoError("Client Error", response=hub_response(401))

    monkeypatch.setattr(hub, "hf_hub_download", fail)
    loaded = []
    monkeypatch.setattr(graph.FrozenNode, "load", lambda spec, *a, **k: loaded.append(spec.name))
    spec = apply_changes(load_preset("tiny"), ["nodes.gemma2.model=google/gemma-2-2b",
                                               "nodes.mistral.model=mistralai/Mistral-7B-v0.1"])
    with pytest.raises(UserError) as info:
        graph.load_nodes(spec, "cpu")
    message = str(info.value)
    assert message.startswith("2 of 5 nodes cannot be loaded, so nothing was: node gemma2: model 'google/gemma-2-2b'")
    assert "node mistral: model 'mistralai/Mistral-7B-v0.1' is gated" in message and loaded == []


def test_a_gated_model_is_told_apart_from_a_missing_one(monkeypatch):
    """Through transformers' own error wrapping: huggingface_hub raises, transformers turns it into an OSError."""
    import transformers.utils.hub as hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from lowmem_graph.errors import UserError
    from lowmem_graph.loading import load_config

    monkeypatch.setattr(hub, "is_offline_mode", lambda: False)       # as online: the download itself fails
    for error, words in [(GatedRepoError, "is gated on the Hugging Face hub: accept its licence"),
                         (RepositoryNotFoundError, "does not exist on the Hugging Face hub")]:
        response = hub_response(401 if error is GatedRepoError else 404)

        def fail(*args, error=error, response=response, **kwargs):
            raise error("Client Error", response=response)

        monkeypatch.setattr(hub, "hf_hub_download", fail)
        with pytest.raises(UserError, match=words):
            load_config("org/model")
