"""More than one process, through PyTorch's own engine: torchrun starts two ranks on the CPU (gloo). A run split
across them trains like one process with the same global batch, writes its folder once, resumes, builds the same
prefix cache, evaluates (sharded) to the same predictions; bad input fails every rank in one line, and no rank
hangs; an lm run too. Each launch costs seconds of start-up, so the tests launch five."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_graph.cache import PrefixCache
from lowmem_graph.cli import main

QUICK = ["--limit-train", "24", "--limit-eval", "8", "--epochs", "1", "--batch-size", "8", "--no-progress"]


def torchrun(args: list[str], n: int = 2, timeout: int = 240, module: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               *(["-m", "lowmem_graph"] if module else []), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _steps(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def test_two_ranks_train_resume_cache_and_evaluate_like_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    # two ranks: stopped after step 1 (a checkpoint), then resumed to the end
    done = torchrun(["train", *QUICK, "--run-dir", str(two), "--cache-dir", str(tmp_path / "c2"), "--max-steps", "1"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_steps(two)) == 1
    done = torchrun(["train", "--resume", str(two), "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: validation accuracy") == 1          # rank 0 speaks, once
    assert done.stdout.count("ranks: 2 processes, each takes") == 1     # and says how many ranks run
    assert main(["train", *QUICK, "--run-dir", str(one), "--cache-dir", str(tmp_path / "c1")]) == 0

    mine, theirs = _steps(two), _steps(one)
    assert [r["step"] for r in mine] == [1, 2, 3]                        # written once, not once per rank
    torch.testing.assert_close([r["loss"] for r in mine], [r["loss"] for r in theirs], rtol=1e-5, atol=1e-6)
    assert [r["acc"] for r in mine] == [r["acc"] for r in theirs]
    a, b = load_file(two / "trainable.safetensors"), load_file(one / "trainable.safetensors")
    # The output node has parameters whose gradient is exactly zero in exact arithmetic (each shifts every
    # choice's logit alike: the score bias, the value, key and output biases, the key norm's bias). Their float
    # rounding noise differs between one process and two, and AdamW normalises noise to steps of size lr: they
    # agree within lr per step. Every other parameter agrees closely.
    null_space = {"output.score.bias", "output.attn.out_proj.bias", "output.key_norm.bias", "output.attn.in_proj_bias"}
    for key in a:
        if key in null_space:
            assert (a[key] - b[key]).abs().max() <= 3 * 3e-3 * 1.01, key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)

    preds = [(two / "predictions-arc-easy-validation.jsonl"), (one / "predictions-arc-easy-validation.jsonl")]
    p2, p1 = ([json.loads(line) for line in p.read_text().splitlines()] for p in preds)
    assert [p["id"] for p in p2] == [p["id"] for p in p1] and len(p2) == 8
    assert [p["prediction"] for p in p2] == [p["prediction"] for p in p1]

    # the prefix cache built by two ranks is the one built by one, entry for entry and row for row (each rank takes
    # whole batches of the length-sorted prompts, so every prompt is batched as in one process), verified the same
    # way on load
    c2, c1 = PrefixCache(tmp_path / "c2"), PrefixCache(tmp_path / "c1")
    keys = sorted(p.name for p in (tmp_path / "c1").iterdir())
    # 5 nodes x 2 sets
    assert set(keys) <= {p.name for p in (tmp_path / "c2").iterdir()} and len(keys) == 10
    for key in keys:
        e2, e1 = c2.load(key), c1.load(key)
        assert e2 is not None and len(e2) == len(e1)
        if len(e1) == 24:                   # three batches of 8: two for rank 0, one for rank 1, each its shards
            assert [s["file"] for s in e2.shards] == ["shard-00000.safetensors", "shard-01000.safetensors"]
        for i in range(len(e1)):
            assert torch.equal(e2.row(i), e1.row(i)), (key, i)


def test_an_lm_run_on_two_ranks_gives_the_one_process_figures(tmp_path):
    """The lm objective (the residual-coupling example) through the same trainer: two ranks, each half of every
    step's passages and the per-token mean over the whole step (tokens counted over both halves), write the run
    once and give one process's losses, perplexities and weights."""
    example = str(Path(__file__).resolve().parents[1] / "examples" / "residual_coupling.yaml")
    two, one = tmp_path / "two", tmp_path / "one"
    args = ["train", "--graph", example, *QUICK]
    done = torchrun([*args, "--run-dir", str(two), "--cache-dir", str(tmp_path / "c2")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--run-dir", str(one), "--cache-dir", str(tmp_path / "c1")]) == 0
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (two, one)]
    steps = [[r for r in rs if r["kind"] == "step"] for rs in records]
    assert [r["step"] for r in steps[0]] == [1, 2, 3] and all(r["variant"] == "coupled" for r in steps[0])
    torch.testing.assert_close([r["loss"] for r in steps[0]], [r["loss"] for r in steps[1]], rtol=1e-5, atol=1e-6)
    assert [r["tokens"] for r in steps[0]] == [r["tokens"] for r in steps[1]]
    (a,), (b,) = ([r["perplexity"] for r in rs if r["kind"] == "epoch"] for rs in records)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4) for k in a)
    w2, w1 = (load_file(run / "weights-coupled.safetensors") for run in (two, one))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-3, atol=1e-5, msg=key)


def test_bad_input_fails_every_rank_in_one_line_and_none_hangs(tmp_path):
    started = time.time()      # the lowmem-graph script itself as the launched program, this time
    script = shutil.which("lowmem-graph", path=str(Path(sys.executable).parent))    # pip's script beside python
    done = torchrun([script, "train", *QUICK, "--task", str(tmp_path / "missing.jsonl"), "--eval-task", "arc-easy",
                     "--run-dir", str(tmp_path / "r")], timeout=120, module=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("lowmem-graph: error:")]
    said = {e.split(" (its run folder ")[0] for e in errors}      # rank 0 adds that it removed the folder
    assert done.returncode != 0 and errors and len(said) == 1, done.stderr[-3000:]
    # (torchrun prints its own ChildFailedError traceback; none comes from a rank)
    assert "missing.jsonl" in errors[0] and "lowmem_graph/" not in done.stderr

    script = tmp_path / "one_fails.py"      # rank 1 dies; rank 0 is waiting for it in a collective
    script.write_text("import sys, torch\nfrom lowmem_graph import distributed\nranks = distributed.current()\n"
                      "if ranks.rank == 1:\n    sys.exit(3)\ndistributed.all_sum(torch.ones(1), ranks)\n")
    done = torchrun([str(script)], module=False, timeout=120)
    assert done.returncode != 0 and time.time() - started < 120


def test_each_rank_takes_its_own_gpu_and_a_gpu_named_by_index_is_refused():
    from lowmem_graph.distributed import Ranks
    from lowmem_graph.errors import UserError

    second = Ranks(rank=1, world=2, local_rank=1)
    assert second.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert second.device(torch.device("cpu")) == torch.device("cpu")
    assert Ranks().device(torch.device("cuda", 3)) == torch.device("cuda", 3)       # one process: as asked
    with pytest.raises(UserError, match="--device cuda:0 with 2 ranks would put every rank on that one GPU"):
        second.device(torch.device("cuda", 0))
