"""Training under a memory plan: nodes on the host, a frozen pass one model at a time, refiners' top layers
checkpointed in groups (some resident, some streamed), micro-batches. Same losses as a plain run."""
import dataclasses
import json

import pytest
import torch

from lowmem_graph.memory.budget import parse_size

from lowmem_graph.ablate import apply_changes
from lowmem_graph.memory import search as planning  # make_plan, as a run imports it when it plans (patched here)
from lowmem_graph.memory.estimate import FrozenPlacement, GroupPlan
from lowmem_graph.spec import load_preset
from lowmem_graph.train import TrainConfig, train

SPEC = apply_changes(load_preset("tiny"), ["nodes.phi3.inject_depth=0.25", "nodes.mistral.inject_depth=0.25"])


def _forced_plan(schedule="micro-batch-major"):
    """The tiny graph fits any budget whole, so the plan is forced: in training, each refiner's layers 1-3 as
    groups of one, layer 1 resident (keeping its activations, but under a layer-major schedule), 2 and 3 streamed;
    in the frozen pass every reader streams its layers after the first (the refiners, injecting at layer 1, have
    one frozen layer)."""
    real = planning.make_plan(SPEC, parse_size("1G"), 8, SPEC.max_length)
    keep = schedule == "micro-batch-major"
    groups = [GroupPlan(node, i, i + 1, 0, resident=(i == 1), checkpointed=not (keep and i == 1))
              for node in ("phi3", "mistral") for i in (1, 2, 3)]
    frozen = {name: FrozenPlacement([GroupPlan(name, i, i + 1, 0, resident=i == 0)
                                     for i in range(sum(g.last - g.first for g in placed.groups))],
                                    2, placed.breakdown)
              for name, placed in real.frozen.items()}
    return dataclasses.replace(real, groups=groups, micro_batch=4, prefetch_depth=2, frozen=frozen, schedule=schedule)


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


@pytest.mark.parametrize("schedule", ["micro-batch-major", "layer-major-host"])
def test_streaming_plan_trains_like_the_plain_run(tmp_path, monkeypatch, schedule):
    spec, forced = SPEC, _forced_plan(schedule)
    monkeypatch.setattr(planning, "make_plan", lambda *args, **kwargs: forced)
    from lowmem_graph.memory import stream
    from lowmem_graph.memory.placement import Placement

    made, visits = [], []
    real_start = Placement.start_steps

    def recorded_start(self, graph):
        fresh = not self.streamers
        real_start(self, graph)
        if fresh and self.streamers:
            made.append(list(self.streamers))

    monkeypatch.setattr(Placement, "start_steps", recorded_start)

    class Recorded(stream.LayerStreamer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            visits.append(self)

    monkeypatch.setattr(stream, "LayerStreamer", Recorded)
    from lowmem_graph import train as training

    eval_batches = []
    real_evaluate = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda graph, questions, batch_size, *a, **k:
                        eval_batches.append(batch_size) or real_evaluate(graph, questions, batch_size, *a, **k))
    base = {**spec.train, "limit_train": 16, "limit_eval": 8, "epochs": 2, "lr": 3e-3}
    quiet = dict(progress=False, log=lambda *_: None)
    # each run its own cache, so the planned run's frozen pass (streamed) is compared with the plain one's too
    planned = train(spec, TrainConfig.from_dict({**base, "gpu_mem": "1G", "cache_dir": str(tmp_path / "c1")}),
                    tmp_path / "planned", **quiet)
    assert eval_batches == [forced.micro_batch] * 2      # evaluation runs at the plan's micro-batch, not the batch
    trained = {id(s) for streamers in made for s in streamers}
    streamed_visits = [v for v in visits if v.order and id(v) not in trained]
    assert len(streamed_visits) == 2 * 3            # the three readers, over the train and the eval set
    assert all(v.loads > 0 and v.slots == [] for v in streamed_visits)
    plain = train(spec, TrainConfig.from_dict({**base, "cache_dir": str(tmp_path / "c2")}), tmp_path / "plain",
                  **quiet)
    streamers = made[-1]
    assert planned["trainer"].placed.streamers == [] and all(s.slots == [] for s in streamers)   # released after training
    assert [len(s.order) for s in streamers] == [2, 2]          # two streamed groups per refiner
    assert all(s.loads > 0 and s.peak_device_bytes <= s.resident_bytes + 2 * s.slot_bytes for s in streamers)
    torch.testing.assert_close(_losses(tmp_path / "planned"), _losses(tmp_path / "plain"), rtol=1e-4, atol=1e-5)
    assert planned["eval_acc"] == plain["eval_acc"]

    # `eval` applies the run's plan too: nodes on the host, the refiners' tops streamed; same predictions
    from lowmem_graph.cli import main

    out = tmp_path / "eval.jsonl"
    assert main(["eval", str(tmp_path / "planned"), "--split", "validation", "--limit", "8", "--out", str(out),
                 "--no-progress"]) == 0
    assert len(made) == 2 and all(s.loads > 0 and s.slots == [] for s in made[-1])     # streamed, then released
    during_training = (tmp_path / "planned" / "predictions-arc-easy-validation.jsonl").read_text().splitlines()
    for mine, theirs in zip(map(json.loads, out.read_text().splitlines()), map(json.loads, during_training)):
        assert mine["id"] == theirs["id"] and mine["prediction"] == theirs["prediction"]
        torch.testing.assert_close(mine["probs"], theirs["probs"], rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("schedule", ["micro-batch-major", "layer-major", "layer-major-host"])
def test_streaming_plan_on_cuda_trains_like_the_plain_run(tmp_path, monkeypatch, schedule):
    """The whole --gpu-mem path on a GPU: host nodes, frozen pass one node at a time, streamed groups, the fused
    Triton injection inside training. bf16 autocast: the same losses within bf16 tolerance."""
    spec, forced = SPEC, _forced_plan(schedule)
    monkeypatch.setattr(planning, "make_plan", lambda *args, **kwargs: forced)
    base = {**spec.train, "limit_train": 16, "limit_eval": 8, "epochs": 2, "lr": 3e-3, "device": "cuda"}
    quiet = dict(progress=False, log=lambda *_: None)
    planned = train(spec, TrainConfig.from_dict({**base, "gpu_mem": "1G", "cache_dir": str(tmp_path / "c1")}),
                    tmp_path / "planned", **quiet)
    train(spec, TrainConfig.from_dict({**base, "cache_dir": str(tmp_path / "c2")}), tmp_path / "plain", **quiet)
    torch.testing.assert_close(_losses(tmp_path / "planned"), _losses(tmp_path / "plain"), rtol=2e-2, atol=2e-2)
    assert planned["memory"]["cuda_peak_allocated_mb"] > 0
