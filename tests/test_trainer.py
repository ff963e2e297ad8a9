"""The one trainer, for either objective: an lm run (next-token, the residual-coupling example) resumes bit for bit
after max_steps or a signal, and a step reads the device once (loss, accuracy, grad norms and the stop flag
together)."""
import collections
import os
import signal
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_graph import runstate
from lowmem_graph.errors import Interrupted
from lowmem_graph.lm import train_lm
from lowmem_graph.spec import load_preset, load_spec
from lowmem_graph.train import TrainConfig, Trainer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "residual_coupling.yaml"
QUIET = dict(progress=False, log=lambda *_: None)
LM = dict(limit_train=24, limit_eval=8, epochs=2, batch_size=8)


def _lm_cfg(tmp_path, **kw):
    spec = load_spec(EXAMPLE)
    return spec, TrainConfig.from_dict({**spec.train, **LM, "cache_dir": str(tmp_path / "cache"), **kw})


def _lm_steps(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in runstate.read_metrics(run / "metrics.jsonl") if r.get("kind") == "step"]


@pytest.fixture(scope="module")
def straight_lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    spec, cfg = _lm_cfg(tmp)
    train_lm(spec, cfg, tmp / "run", **QUIET)
    return tmp / "run"


@pytest.mark.parametrize("how", ["max_steps", "signal"])
def test_an_lm_run_stopped_and_resumed_ends_with_the_straight_runs_weights(tmp_path, monkeypatch, straight_lm, how):
    run = tmp_path / "run"
    if how == "max_steps":
        spec, cfg = _lm_cfg(tmp_path, max_steps=2)
        train_lm(spec, cfg, run, **QUIET)
    else:
        spec, cfg = _lm_cfg(tmp_path)
        real = Trainer.train_step

        def step_then_signal(self, items, inputs=None):
            out = real(self, items, inputs)
            if self.step + 1 == 4:          # during step 4 (the first of epoch 2)
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        monkeypatch.setattr(Trainer, "train_step", step_then_signal)
        with pytest.raises(Interrupted) as info:
            train_lm(spec, cfg, run, **QUIET)
        assert info.value.code == 143
        monkeypatch.undo()
    stopped = runstate.load_checkpoint(run)
    assert stopped.variant == "coupled" and stopped.step == (2 if how == "max_steps" else 4)
    assert not (run / "weights-coupled.safetensors").exists()
    spec, cfg = _lm_cfg(tmp_path)
    results = train_lm(spec, cfg, run, resume=True, **QUIET)
    assert results["coupled"]["steps"] == 6
    assert _lm_steps(run) == _lm_steps(straight_lm)          # every step once, the same losses
    a, b = load_file(run / "weights-coupled.safetensors"), load_file(straight_lm / "weights-coupled.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__"}
# Host reads that are not device reads: AdamW keeps its step counters on the host (not capturable, not fused),
# and reads them each step.
HOST_SIDE = ("torch/optim/",)


def _caller() -> str:
    """The innermost frame outside torch's own dispatch code."""
    frame = next((f for f in reversed(traceback.extract_stack()[:-2]) if "torch/overrides" not in f.filename
                  and "torch/_tensor" not in f.filename and "torch/utils/_python_dispatch" not in f.filename
                  and "test_trainer.py" not in f.filename), None)
    return f"{frame.filename}:{frame.lineno}" if frame else "?"


class HostReads(TorchFunctionMode):
    """Every Python-level read of a tensor's value into the host (item, tolist, cpu, bool(), float() ...)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if "torch/overrides" not in f.filename
                           and "torch/_tensor" not in f.filename), None)
            where = f"{caller.filename}:{caller.lineno}" if caller else "?"
            if not any(part in where for part in HOST_SIDE):
                self.reads.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))


# Operators whose output's size depends on the values (a boolean index, nonzero, masked_select, unique ...): on a
# GPU each waits for the device to know how much to allocate, a read no Python-level hook sees.
DATA_DEPENDENT = ("nonzero", "masked_select", "unique", "_unique", "_local_scalar_dense", "repeat_interleave")


class DataDependentOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] if len(args) > 1 else ()) if i is not None)
        stack = traceback.extract_stack()
        if (name.startswith(DATA_DEPENDENT) or bool_index) and not any(
                part in f.filename for f in stack for part in HOST_SIDE):
            self.ops.append(f"{func} at {_caller()}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective", ["choice", "lm"])
def test_a_train_step_reads_the_device_once(tmp_path, objective):
    if objective == "lm":
        spec, cfg = _lm_cfg(tmp_path, limit_train=16, epochs=1)
    else:
        spec = load_preset("tiny")
        cfg = TrainConfig.from_dict({**spec.train, "limit_train": 16, "limit_eval": 8, "epochs": 1,
                                     "cache_dir": str(tmp_path / "cache")})
    trainer = Trainer(spec, cfg, tmp_path / "run", variant="coupled" if objective == "lm" else None, **QUIET)
    try:
        items = trainer.train_set[:8]
        trainer.train_step(items, trainer.step_inputs(items))       # a first step (lazy inits)
        inputs = trainer.step_inputs(items)     # made ahead, on another thread, by fit
        with HostReads() as mode, DataDependentOps() as ops:
            metrics = trainer.train_step(items, inputs)
    finally:
        trainer.close()
    assert ops.ops == [], collections.Counter(ops.ops)
    assert len(mode.reads) <= 1, collections.Counter(mode.reads)
    assert len(mode.reads) == 1 and "train.py" in mode.reads[0]
    assert metrics["grad_norm"] > 0 and metrics["grad_norms"] and metrics["loss"] > 0


def test_a_multiple_choice_evaluation_reads_the_device_once_per_batch(tiny_graph, questions):
    """Evaluation reads each batch's probabilities, routing shares and summed loss in one read; questions without
    an answer (asked of a trained graph) count in no loss, without a read to find them."""
    import dataclasses

    from lowmem_graph.evaluate import evaluate

    asked = [dataclasses.replace(q, label=-1) if i % 3 == 0 else q for i, q in enumerate(questions[:12])]
    evaluate(tiny_graph, asked[:4], batch_size=4, progress=False)       # a first pass (lazy inits)
    with HostReads() as mode:
        result = evaluate(tiny_graph, asked, batch_size=4, progress=False)
    assert len(mode.reads) == 3 and all("evaluate.py" in r for r in mode.reads), collections.Counter(mode.reads)
    assert result.n == sum(q.label >= 0 for q in asked) and len(result.predictions) == 12
    known = [q for q in asked if q.label >= 0]
    alone = evaluate(tiny_graph, known, batch_size=4, progress=False)
    assert result.loss == pytest.approx(alone.loss, rel=1e-6) and result.accuracy == alone.accuracy


@pytest.mark.parametrize("variant", ["coupled", "alone", "router"])
def test_an_lm_evaluation_reads_the_device_once(lm_graph, variant):
    """Perplexity over batches with and without padding: each node's masks made at collation, one read at the end."""
    from lowmem_graph.objectives import Baseline, NextToken

    graph, routers = lm_graph
    model = graph if variant == "coupled" else Baseline(graph, variant)
    if variant == "router":
        model.router = routers["router"]
    texts = ["Plants take in carbon dioxide and give out oxygen.", "Ice melts.", "The Sun is a star.",
             "The Sun is a star."]            # the last batch is unpadded
    items = [(str(i), t) for i, t in enumerate(texts)]
    objective = NextToken(variant)
    objective.evaluate(model, graph, items[:2], batch_size=2, progress=False)      # a first pass (lazy inits)
    with HostReads() as mode, DataDependentOps() as ops:
        result = objective.evaluate(model, graph, items, batch_size=2, progress=False)
    assert ops.ops == [], collections.Counter(ops.ops)
    assert len(mode.reads) == 1 and "objectives.py" in mode.reads[0], collections.Counter(mode.reads)
    assert set(result) == set(graph.reads) and all(p > 1 for p in result.values())


@pytest.mark.gpu
def test_train_steps_sync_only_at_their_one_read_on_cuda(tmp_path):
    """On a GPU, steps under torch.cuda.set_sync_debug_mode("error"): any synchronising call but the step's one
    read (train.the_one_read) raises."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    spec = load_preset("tiny")
    cfg = TrainConfig.from_dict({**spec.train, "limit_train": 24, "limit_eval": 8, "epochs": 1, "device": "cuda",
                                 "cache_dir": str(tmp_path / "cache")})
    trainer = Trainer(spec, cfg, tmp_path / "run", **QUIET)
    try:
        steps = [trainer.train_set[i:i + 8] for i in (0, 8, 16)]
        trainer.train_step(steps[0], trainer.step_inputs(steps[0]))
        inputs = [trainer.step_inputs(items) for items in steps[1:]]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for items, made in zip(steps[1:], inputs):
                trainer.train_step(items, made)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        trainer.close()


def test_an_lm_step_tokenizes_each_passage_once(tmp_path, monkeypatch):
    """A step's inputs (its micro-batches and its norm, the step's predicted tokens per node) encode every passage
    once per node, alone or as one of several ranks, and the norm is the count of the whole step collated at
    once."""
    from lowmem_graph.distributed import Ranks

    spec, cfg = _lm_cfg(tmp_path, limit_train=16, epochs=1, prefix_cache=False)
    trainer = Trainer(spec, cfg, tmp_path / "run", variant="coupled", **QUIET)
    try:
        items = trainer.train_set[:7]
        whole = trainer.graph.collate_text([t for _, t in items], [i for i, _ in items])
        expected = {j: float(whole.picks[j].numel()) for j in trainer.graph.reads}
        encoded = collections.Counter()
        for name, node in trainer.graph.nodes.items():
            real = node.encode

            def counting(texts, *args, _real=real, _name=name, **kwargs):
                encoded.update((_name, t) for t in texts)
                return _real(texts, *args, **kwargs)

            monkeypatch.setattr(node, "encode", counting)
            real_masks = node.masks

            def masking(mask, *args, _real=real_masks, _name=name, **kwargs):
                masked[_name] += len(mask)
                return _real(mask, *args, **kwargs)

            monkeypatch.setattr(node, "masks", masking)
        trainer.micro_batch = 3
        for world in (1, 2, 3):
            for rank in range(world):
                trainer.ranks = Ranks(rank=rank, world=world)
                encoded.clear()
                masked = collections.Counter()
                _, norm, idle = trainer.step_inputs(items)
                assert not idle and norm == {j: n / world for j, n in expected.items()}, (world, rank)
                assert encoded == collections.Counter((n, t) for n in trainer.graph.nodes for _, t in items)
                # attention masks only for this rank's own rows: the other ranks' passages are only counted
                assert masked == {n: len(items) // world + (rank < len(items) % world) for n in trainer.graph.nodes}
    finally:
        trainer.ranks = Ranks()
        trainer.close()
