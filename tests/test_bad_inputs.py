"""The catalogue of bad inputs: each one is one line on stderr, exit code 2, no traceback, and names what and where.

A row is (what is wrong, how to make it, the words the line must hold). `setup(tmp)` writes what the case needs
and returns the command line. The table only grows: a new bad input found anywhere gets a row here.
"""
import errno
import json
from pathlib import Path

import pytest
import yaml

from lowmem_graph.cli import main
from lowmem_graph.spec import preset_path

TINY = yaml.safe_load((Path(__file__).parent / "data" / "tiny_roles.yaml").read_text())   # the role form
EDGES = yaml.safe_load(preset_path("tiny").read_text())                                     # the edges form
COUPLED = yaml.safe_load((Path(__file__).parents[1] / "examples" / "residual_coupling.yaml").read_text())
QUICK = ["--limit-train", "8", "--limit-eval", "4", "--epochs", "1", "--no-progress"]


def spec_file(tmp, change=None, text=None, raw=None, base=None):
    path = tmp / "g.yaml"
    if raw is not None:
        path.write_bytes(raw)
    elif text is not None:
        path.write_text(text)
    else:
        spec = json.loads(json.dumps(base or TINY))
        change(spec)
        path.write_text(yaml.safe_dump(spec))
    return str(path)


def arc_row(i=0, stem="Which gas do plants take in?", texts=("oxygen", "carbon dioxide"), answer="B"):
    choices = [{"text": t, "label": "AB"[k]} for k, t in enumerate(texts)]
    return json.dumps({"id": f"q{i}", "question": {"stem": stem, "choices": choices}, "answerKey": answer})


def data_dir(tmp, body: bytes):
    folder = tmp / "data"
    folder.mkdir(exist_ok=True)
    (folder / "ARC-Easy-Train.jsonl").write_bytes(body)
    return ["--data-dir", str(folder), "--task", "arc-easy", "--eval-task", "arc-easy", "--eval-split", "train"]


def run_folder(tmp, config=None, weights=b"not safetensors"):
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config if config is not None else
                                     yaml.safe_dump({"graph": TINY, "train": {"epochs": 1}}))
    (run / "trainable.safetensors").write_bytes(weights)
    return str(run)


def _set(path, value):
    def change(spec):
        target = spec
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _edges(change):
    return lambda t: ["inspect", "--graph", spec_file(t, change, base=EDGES)]


def _add_edge(**edge):
    return lambda spec: spec["edges"].append(edge)


CASES = [
    # --- graph specs in the edges form ---------------------------------------------------------------------
    ("edges: unknown key", _edges(_set(["edges", 0, "weight"], 2)), ["edges[0]", "unknown key(s) weight"]),
    ("edges: unknown end", _edges(_set(["edges", 0, "to"], "w")), ["edges[0]", "'w' is neither a node"]),
    ("edges: no read layer", _edges(_set(["edges", 0, "read"], None)), ["edges[0]", "needs 'read'"]),
    ("edges: depth out of range", _edges(_set(["edges", 3, "at"], 1.5)), ["edges[3]", "needs 'at'"]),
    ("edges: bad kind", _edges(_set(["edges", 3, "kind"], "add")), ["edges[3]", "kind must be one of blend, bridge"]),
    ("edges: a cycle through latents", _edges(lambda s: (s["latents"].append({"name": "w", "dim": 32}),
                                                         s["edges"].extend([{"from": "phi3", "read": 2, "to": "w"},
                                                                            {"from": "w", "to": "llama", "at": 0.5}]))),
     ["the graph has a cycle: z -> phi3, phi3 -> w, w -> llama, llama -> z"]),
    ("edges: a bridge writing below its read", _edges(_add_edge(**{"from": "phi3", "read": 3, "to": "mistral",
                                                                   "at": 2, "kind": "bridge"})),
     ["runs in lockstep", "phi3 layer 3 -> mistral layer 2"]),
    ("edges: a bridge writing at its read layer, counted from the top",
     _edges(_add_edge(**{"from": "phi3", "read": -1, "to": "mistral", "at": 4, "kind": "bridge"})),
     ["bridge phi3 -> mistral", "reads layer 4 and writes at layer 4"]),
    ("edges: a node nothing reads", _edges(lambda s: (s["nodes"].append({"name": "extra", "model": "tiny:qwen2"}),
                                                      s["edges"].append({"from": "z", "to": "extra", "at": 0.5}))),
     ["node extra: nothing reads it"]),
    ("lm objective on the paper's shape", lambda t: ["train", "--objective", "lm", "--run-dir", str(t / "r"), *QUICK],
     ["lm objective runs on graphs given by their edges"]),
    ("lm objective with a pooled edge", lambda t: ["train", "--run-dir", str(t / "r"), *QUICK, "--graph", spec_file(
        t, _set(["edges", 0, "pooling"], "mean"), base=COUPLED)],
     ["edge llama -> mistral: pooling mean sees the whole text", "pooling: token"]),
    ("lm text that is not there", lambda t: ["train", "--objective", "lm", "--task", str(t / "none.txt"),
                                             "--graph", str(Path(__file__).parents[1] / "examples" /
                                                            "residual_coupling.yaml"), "--run-dir", str(t / "r"), *QUICK],
     ["none.txt", "no such file"]),
    ("lm text from an unreachable data set", lambda t: ["train", "--task", "hf:nobody/nothing", "--graph",
                                                        str(Path(__file__).parents[1] / "examples" /
                                                            "residual_coupling.yaml"), "--run-dir", str(t / "r"),
                                                        *QUICK],
     ["nobody/nothing"]),
    ("ridge start on a graph given by its edges", lambda t: ["train", "--graph", str(Path(__file__).parents[1] /
                                                                      "examples" / "three_layers.yaml"),
                                                             "--init", "ridge", "--run-dir", str(t / "r"), *QUICK],
     ["ridge fits the maps of the paper's shape"]),
    ("--compare without the lm objective", lambda t: ["train", "--compare", "--run-dir", str(t / "r"), *QUICK],
     ["--compare", "--objective lm"]),
    ("edges: role beside edges", _edges(_set(["nodes", 0, "role"], "reader")), ["role comes from its edges"]),
    ("edges: output reads a stranger", _edges(_set(["output", "reads"], ["phi3", "nobody"])),
     ["output.reads must list the nodes"]),
    ("edges: a latent with no way out", _edges(lambda s: s["latents"].append({"name": "w", "dim": 8})),
     ["latent 'w' needs an edge into it and one out of it"]),
    # --- graph specs -----------------------------------------------------------------------------------------
    ("spec: broken YAML", lambda t: ["inspect", "--graph", spec_file(t, text="nodes: [\n  {name: a\n")],
     ["g.yaml", "line", "invalid YAML"]),
    ("spec: not UTF-8", lambda t: ["inspect", "--graph", spec_file(t, raw=b"name: x\nnodes: []\n# caf\xe9\n")],
     ["g.yaml", "line 3", "not UTF-8"]),
    ("spec: heads 0", lambda t: ["inspect", "--graph", spec_file(t, _set(["output", "heads"], 0))],
     ["output", "heads must be >= 1"]),
    ("spec: prefix 123", lambda t: ["inspect", "--graph", spec_file(t, _set(["nodes", 0, "prefix"], 123))],
     ["nodes[0]", "prefix", "must be str"]),
    ("spec: blend as text", lambda t: ["inspect", "--graph", spec_file(t, _set(["nodes", 3, "blend"], "lots"))],
     ["nodes[3]", "blend", "must be float"]),
    ("spec: trust_remote_code 'yes'",
     lambda t: ["inspect", "--graph", spec_file(t, _set(["nodes", 0, "trust_remote_code"], "yes"))],
     ["trust_remote_code", "must be bool"]),
    ("spec: null latent_dim", lambda t: ["inspect", "--graph", spec_file(t, _set(["latent_dim"], None))],
     ["latent_dim", "required"]),
    ("spec: name escapes --out", lambda t: ["inspect", "--graph", spec_file(t, _set(["name"], "../../x"))],
     ["graph name", "'../../x'"]),
    ("spec: node name with a slash", lambda t: ["inspect", "--graph", spec_file(t, _set(["nodes", 0, "name"], "a/b"))],
     ["nodes[0]", "node name", "'a/b'"]),
    ("spec: epochs as text", lambda t: ["train", "--graph", spec_file(t, _set(["train", "epochs"], "abc")), *QUICK[:4]],
     ["train", "epochs", "must be int"]),
    ("spec: unknown train setting", lambda t: ["train", "--graph", spec_file(t, _set(["train", "epoch"], 2))],
     ["unknown setting", "epoch"]),
    ("unknown preset", lambda t: ["inspect", "--preset", "huge"], ["unknown preset 'huge'"]),
    # --- flags ------------------------------------------------------------------------------------------------
    ("--lr nan", lambda t: ["train", "--lr", "nan", *QUICK], ["lr", "finite"]),
    ("--lr inf", lambda t: ["train", "--lr", "inf", *QUICK], ["lr", "finite"]),
    ("--lr 0", lambda t: ["train", "--lr", "0", *QUICK], ["lr must be > 0"]),
    ("--limit-train 0", lambda t: ["train", "--limit-train", "0"], ["limit_train must be >= 1"]),
    ("--limit-train -5", lambda t: ["train", "--limit-train", "-5"], ["limit_train must be >= 1"]),
    ("--max-steps 0", lambda t: ["train", "--max-steps", "0", *QUICK], ["max_steps must be >= 1"]),
    ("--checkpoint-every -1", lambda t: ["train", "--checkpoint-every", "-1", *QUICK], ["checkpoint_every"]),
    ("--batch-size 0", lambda t: ["train", "--batch-size", "0", *QUICK], ["batch_size must be >= 1"]),
    ("--set broken YAML", lambda t: ["train", "--set", "latent_dim=[1", *QUICK], ["--set latent_dim=[1", "YAML"]),
    ("--set name outside --out", lambda t: ["train", "--set", "name=../../x", *QUICK], ["graph name", "../../x"]),
    ("--set without =", lambda t: ["train", "--set", "latent_dim", *QUICK], ["expected key=value"]),
    ("--gpu-mem lots", lambda t: ["train", "--gpu-mem", "lots", *QUICK], ["memory size 'lots'"]),
    ("task@0", lambda t: ["train", "--task", "arc-easy@0", *QUICK], ["@0", ">= 1"]),
    ("unknown task", lambda t: ["train", "--task", "arc-hard", *QUICK], ["unknown task 'arc-hard'"]),
    ("plan: host memory too small", lambda t: ["plan", "--preset", "paper", "--gpu-mem", "6G", "--host-mem", "2G"],
     ["host memory", "2.00 GiB is available"]),
    # --- data files -------------------------------------------------------------------------------------------
    ("data: not UTF-8", lambda t: ["train", *data_dir(t, arc_row().encode() + b"\n" + b'{"id": "caf\xe9"}\n'), *QUICK],
     ["ARC-Easy-Train.jsonl:2", "not UTF-8"]),
    ("data: null stem", lambda t: ["train", *data_dir(t, arc_row(stem=None).encode()), *QUICK],
     ["ARC-Easy-Train.jsonl:1", "question text"]),
    ("data: null choice", lambda t: ["train", *data_dir(t, arc_row(texts=("a", None)).encode()), *QUICK],
     ["ARC-Easy-Train.jsonl:1", "choice must be text"]),
    ("data: a 20 MB line", lambda t: ["train", *data_dir(t, arc_row().encode() + b"\n" + b"x" * (20 << 20)), *QUICK],
     ["ARC-Easy-Train.jsonl:2", "20.0 MiB"]),
    ("data: bad JSON", lambda t: ["train", *data_dir(t, b'{"id": \n'), *QUICK], ["ARC-Easy-Train.jsonl:1", "bad JSON"]),
    ("data: answer not a label", lambda t: ["train", *data_dir(t, arc_row(answer="E").encode()), *QUICK],
     ["ARC-Easy-Train.jsonl:1", "answer 'E'"]),
    # --- run folders ------------------------------------------------------------------------------------------
    ("eval: trainable.safetensors corrupt", lambda t: ["eval", run_folder(t)], ["trainable.safetensors", "unreadable"]),
    ("eval: config.yaml broken", lambda t: ["eval", run_folder(t, config="graph: [\n")], ["config.yaml", "YAML"]),
    ("eval: config.yaml not a run's", lambda t: ["eval", run_folder(t, config="- 1\n- 2\n")],
     ["config.yaml", "not a run's config"]),
    ("eval: --limit 0", lambda t: ["eval", run_folder(t), "--limit", "0"], ["--limit must be >= 1"]),
    ("resume: not a run folder", lambda t: ["train", "--resume", str(t)], ["not a run folder"]),
    ("resume: config.yaml not UTF-8", lambda t: ["train", "--resume", _latin1_config(t)], ["config.yaml", "not UTF-8"]),
    ("--run-dir not empty", lambda t: ["train", "--run-dir", _non_empty(t), *QUICK], ["exists and is not empty"]),
    ("--out is a file", lambda t: ["train", "--out", _a_file(t), *QUICK], ["cannot make the runs folder"]),
    ("reproduce: protocol broken", lambda t: ["reproduce", "--protocol", spec_file(t, text="train: {epochs: [\n")],
     ["g.yaml", "invalid YAML"]),
    # --- what still ended in a traceback (issue 27.3) -------------------------------------------------------
    ("spec: a model whose config is invalid", lambda t: ["inspect", "--graph", spec_file(
        t, _set(["nodes", 0, "model"], _bad_model(t)))], ["is invalid", "not a multiple of the number of attention"]),
    ("spec: nested 3,000 deep", lambda t: ["inspect", "--graph", spec_file(t, text=DEEP)],
     ["g.yaml", "nested more than 64 levels"]),
    ("eval: config.yaml nested 3,000 deep", lambda t: ["eval", run_folder(t, config="graph: " + DEEP)],
     ["config.yaml", "nested more than 64 levels"]),
    ("--seed -1", lambda t: ["train", "--seed", "-1", *QUICK], ["seed must be in [0, 2**32)", "-1"]),
    ("--seed 2**40", lambda t: ["train", "--seed", str(2 ** 40), *QUICK], ["seed must be in [0, 2**32)"]),
    ("matrix --seeds 2**40", lambda t: ["matrix", "--seeds", f"0,{2 ** 40}", *QUICK], ["--seeds", "[0, 2**32)"]),
    ("probe-quant --batch-size 0", lambda t: ["probe-quant", "tiny:llama", "--batch-size", "0"],
     ["--batch-size must be >= 1"]),
    ("lm text not UTF-8", lambda t: _lm(t, "text.txt", b"a line\ncaf\xe9\n"), ["text.txt:2", "not UTF-8"]),
    ("lm JSONL not JSON", lambda t: _lm(t, "text.jsonl", b'{"text": "a"}\n{"text": \n'),
     ["text.jsonl:2", "bad JSON"]),
    ("figures: metrics.jsonl with a loss as text", lambda t: ["figures", _with_metrics(
        t, {"kind": "step", "step": 1, "epoch": 1, "loss": "low"})], ["metrics.jsonl: record 1", "loss", "'low'"]),
    ("figures: metrics.jsonl with a step as text", lambda t: ["figures", _with_metrics(
        t, {"kind": "epoch", "step": 2.5, "epoch": 1})], ["metrics.jsonl: record 1", "step", "whole number"]),
    # --- what was accepted silently (27.4) ------------------------------------------------------------------
    ("spec: epochs 0 under --epochs", lambda t: ["train", "--graph", spec_file(t, _set(["train", "epochs"], 0)),
                                                 *QUICK], ["train: epochs must be >= 1, got 0"]),
    ("--columns without a hub task", lambda t: ["train", "--columns", "question=q", *QUICK],
     ["columns 'question=q'", "no task is one (hf:ORG/NAME)"]),
    ("probe-quant --threshold nan", lambda t: ["probe-quant", "tiny:llama", "--threshold", "nan"],
     ["--threshold must be a finite"]),
    ("predict --input an empty file", lambda t: ["predict", run_folder(t), "--input", _file(t, "empty.jsonl", b"")],
     ["empty.jsonl", "no questions"]),
    ("a task file named with a split", lambda t: ["train", "--task", _file(t, "mine.jsonl", b"") + ":validation",
                                                  "--eval-task", str(t / "mine.jsonl"), *QUICK],
     ["mine.jsonl is one file, with no splits", "':validation' would be ignored"]),
    # --- YAML bombs (27.5): refused at once --------------------------------------------------------------------
    ("spec: billion laughs", lambda t: ["inspect", "--graph", spec_file(t, text=BOMB)],
     ["g.yaml", "once its aliases are expanded"]),
    ("spec: an alias of itself", lambda t: ["inspect", "--graph", spec_file(t, text="nodes: &n [*n]\n")],
     ["g.yaml", "nested more than 64 levels"]),
    ("spec: over 1 MiB", lambda t: ["inspect", "--graph", spec_file(t, raw=b"#" * (1 << 20) + b"\nname: x\n")],
     ["g.yaml", "over 1 MiB"]),
    ("--set an alias bomb", lambda t: ["inspect", "--set", "latent_dim=" + BOMB_FLOW], ["--set", "aliases"]),
    # --- failures before the first step leave no folder (27.6; the test checks nothing is left) -----------------
    ("matrix: unknown task", lambda t: ["matrix", "--task", "arc-hard", *QUICK],
     ["unknown task 'arc-hard'", "is removed: nothing had run"]),
    ("matrix: a value out of range", lambda t: ["matrix", "--vary", "nodes.phi3.blend=2", *QUICK],
     ["blend must be in [0, 1]", "is removed: nothing had run"]),
    ("baselines: no such task file", lambda t: ["baselines", "--task", str(t / "no.jsonl"), "--eval-task",
                                                str(t / "no.jsonl"), *QUICK], ["no file at", "is removed"]),
    # --- models (27.9) ------------------------------------------------------------------------------------------
    ("a local model whose weights are a pickle", lambda t: ["probe-quant", _pickled_model(t), "--limit", "1"],
     ["weights are a pickle that does not load safely", "posix.system"]),
    # --- run folders that reach outside themselves, or lie ---------------------------------------------------------
    ("eval: checkpoint link to ..", lambda t: ["eval", _linked(t, "checkpoint", "..")], ["checkpoint", "outside"]),
    ("eval: checkpoint link to an absolute path outside", lambda t: ["eval", _linked(t, "checkpoint", t / "other")],
     ["checkpoint", "outside"]),
    ("eval: config.yaml a link outside", lambda t: ["eval", _linked(t, "config.yaml", t / "elsewhere.yaml")],
     ["config.yaml", "outside"]),
    ("resume: .checkpoints a link outside", lambda t: ["train", "--resume", _linked(t, ".checkpoints", t / "other")],
     [".checkpoints", "outside"]),
    ("resume: metrics.jsonl a link outside",
     lambda t: ["train", "--resume", _linked(t, "metrics.jsonl", t / "other" / "log.txt")], ["metrics.jsonl", "outside"]),
    ("figures: curves.png a link outside", lambda t: ["figures", _linked(t, "curves.png", t / "other" / "x.png")],
     ["curves.png", "outside"]),
    ("eval: checkpoint weights with a flipped bit", lambda t: ["eval", _damaged_checkpoint(t)],
     ["trainable.safetensors is damaged"]),
    ("predict: checkpoint weights with a flipped bit",
     lambda t: ["predict", _damaged_checkpoint(t), "--question", "Q?", "--choices", "a", "b"],
     ["trainable.safetensors is damaged"]),
    ("export: checkpoint weights with a flipped bit", lambda t: ["export", _damaged_checkpoint(t), str(t / "out")],
     ["trainable.safetensors is damaged"]),
    ("eval: checkpoint link leads nowhere", lambda t: ["eval", _linked(t, "checkpoint", ".checkpoints/step-0000009")],
     ["checkpoint link leads nowhere"]),
]

DEEP = "[" * 3000 + "]" * 3000
BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{c}: &{c} [{', '.join(['*' + b] * 9)}]\n" for b, c in zip("abcdefgh", "bcdefghi")) + "nodes: [*i]\n"
BOMB_FLOW = "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
            "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]"


def _file(tmp, name, body: bytes):
    (tmp / name).write_bytes(body)
    return str(tmp / name)


def _bad_model(tmp):
    """A local model folder whose config no model can have: 32 wide, 12 heads."""
    folder = tmp / "bad-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 12,
                                                    "num_hidden_layers": 2, "intermediate_size": 64,
                                                    "vocab_size": 100}))
    return str(folder)


def _pickled_model(tmp):
    """The tiny llama's config and tokenizer beside weights that are a pickle calling os.system."""
    import os
    import shutil

    import torch

    from lowmem_graph.tiny import tiny_path

    folder = tmp / "pickled"
    folder.mkdir()
    for f in tiny_path("llama").iterdir():
        if f.suffix == ".json":
            shutil.copy(f, folder)
    torch.save({"model.embed_tokens.weight": os.system}, folder / "pytorch_model.bin")
    return str(folder)


def _lm(tmp, name, body: bytes):
    return ["train", "--objective", "lm", "--graph", str(Path(__file__).parents[1] / "examples" /
                                                         "residual_coupling.yaml"),
            "--task", _file(tmp, name, body), "--run-dir", str(tmp / "r"), *QUICK]


def _with_metrics(tmp, record: dict):
    run = run_folder(tmp)
    (Path(run) / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return run


def _latin1_config(tmp):
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(b"graph: {name: caf\xe9}\n")
    return str(run)


def _linked(tmp, name, target):
    """A run folder in which `name` is a symbolic link to `target` (made, as a file or folder, if outside)."""
    run = Path(run_folder(tmp))
    (tmp / "other").mkdir(exist_ok=True)
    (tmp / "elsewhere.yaml").write_text((run / "config.yaml").read_text())
    (tmp / "other" / "log.txt").write_text("someone else's file\n")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(target)
    return str(run)


def _damaged_checkpoint(tmp):
    """A run folder whose checkpoint's weights had a bit flipped inside their data (the header intact)."""
    import torch

    from lowmem_graph.runstate import save_checkpoint

    run = Path(run_folder(tmp))
    (run / "trainable.safetensors").unlink()
    save_checkpoint(run, 1, {"w": torch.ones(64)}, {"state": {}, "param_groups": []}, {})
    weights = (run / "trainable.safetensors").resolve()
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x04
    weights.write_bytes(bytes(data))
    return str(run)


def _non_empty(tmp):
    (tmp / "busy").mkdir()
    (tmp / "busy" / "something").write_text("x")
    return str(tmp / "busy")


def _a_file(tmp):
    (tmp / "runs").write_text("a file where the runs folder would go")
    return str(tmp / "runs")


@pytest.mark.parametrize("what, make, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, what, make, words):
    monkeypatch.chdir(tmp_path)         # the default runs/ folder lands here, and is checked with the rest
    argv = make(tmp_path)
    capsys.readouterr()                 # what making the case said (a tiny model built) is not the command's
    before = set(tmp_path.rglob("*"))
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (what, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("lowmem-graph: error:"), err[-2000:]
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    left = set(tmp_path.rglob("*")) - before        # nothing half-made stays (an empty runs/ root may)
    assert [p for p in left if p != tmp_path / "runs" or any(p.iterdir())] == [], sorted(left)


def test_plain_hub_ids_are_hub_ids_unless_a_local_path_has_the_name(tmp_path, monkeypatch):
    from lowmem_graph.loading import resolve_model

    monkeypatch.chdir(tmp_path)
    assert resolve_model("gpt2") == ("gpt2", False)
    assert resolve_model("openai-community/gpt2") == ("openai-community/gpt2", False)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text("{}")
    assert resolve_model("gpt2") == ("gpt2", True)


@pytest.mark.parametrize("offline_mode", [False, True])
def test_an_unreachable_hub_is_one_line_at_once(tmp_path, capsys, monkeypatch, offline_mode):
    """No network: one request, no retries (huggingface_hub's take 30 s and a dozen lines); offline mode: none."""
    import huggingface_hub
    from huggingface_hub import constants

    class ConnectError(Exception):      # httpx's (huggingface_hub 1.x) or httpx2's (2.x): told apart by name
        pass

    asked = []

    def unreachable(url, **kwargs):
        asked.append(url)
        raise ConnectError("[Errno 111] Connection refused")

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_mode)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    code = main(["inspect", "--set", "nodes.llama.model=gpt2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err[-2000:]
    assert "cannot reach the Hugging Face hub for model 'gpt2'" in err
    assert len(asked) == (0 if offline_mode else 1)


def test_a_full_disk_is_said_so(tmp_path, capsys, monkeypatch):
    from lowmem_graph import train as training

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs" / "x" / "config.yaml"))

    monkeypatch.setattr(training, "save_config", full)
    code = main(["train", "--out", str(tmp_path / "runs"), *QUICK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "disk is full" in err and "config.yaml" in err


def test_out_of_host_memory_is_said_so(tmp_path, capsys, monkeypatch):
    from lowmem_graph import train as training

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(training.Trainer, "__init__", exhausted)
    code = main(["train", "--out", str(tmp_path / "runs"), *QUICK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "out of host memory" in err
    assert not list((tmp_path / "runs").glob("*"))       # nothing half-written left


def test_yaml_reads_1e_3_as_a_string_and_we_accept_it():
    from lowmem_graph.train import TrainConfig

    raw = yaml.safe_load("lr: 1e-3\nepochs: 2\n")
    assert raw["lr"] == "1e-3"                               # YAML 1.1's float needs a dot
    assert TrainConfig.from_dict(raw).lr == pytest.approx(1e-3)

