"""Accuracy with a 95% interval, and per-question predictions a person can audit."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import transfer
from .questions import Question
from .files import atomic_file
from .nodes import autocast
from .progress import progress as bar


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval: sound for small n and accuracies near 0 or 1, unlike the normal one."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class EvalResult:
    accuracy: float
    interval: tuple[float, float]
    loss: float
    n: int
    routing: list[float]                         # mean output-node attention share per refiner
    predictions: list[dict] = field(repr=False)

    def summary(self) -> str:
        lo, hi = self.interval
        return f"acc {self.accuracy:.3f} [95% CI {lo:.3f}, {hi:.3f}] loss {self.loss:.3f} n={self.n}"


@torch.no_grad()
def evaluate(graph, questions: list[Question], batch_size: int = 8, progress: bool = True,
             desc: str = "eval", states=None, ranks=None, objective=None, model=None) -> EvalResult:
    """`batch_size` questions per forward (under a memory plan: its micro-batch). `states`: the frozen pass over
    these questions (frozen_pass.run_frozen_pass), so only the refiners' tops run. Same autocast as training.
    Under several `ranks` (distributed.Ranks) each evaluates its slice of the questions and every rank gets the
    one result over all of them, in the questions' order. Another `objective` than multiple choice (objectives.py)
    evaluates its own way, through `model` (what trained: the graph, or a baseline's module)."""
    from .distributed import Ranks, gather, shard

    if objective is not None and hasattr(objective, "evaluate"):
        return objective.evaluate(model if model is not None else graph, graph, questions, batch_size, progress,
                                  desc, states, ranks)

    ranks = ranks or Ranks()
    graph.eval()
    device = next(graph.parameters()).device
    predictions, total_loss, routing = [], 0.0, []
    mine = shard(questions, ranks)
    chunks = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]

    def packed(chunk):          # on another thread, while the batch before computes
        batch = graph.collate(chunk)
        return chunk, transfer.pack(graph, batch, states.gather(batch) if states is not None else None)

    for chunk, made in bar(transfer.ahead(packed, chunks), len(chunks), f"{desc} batch", progress):
        batch, cached = transfer.arrive(made)
        with autocast(device):
            out = graph(batch, cached) if cached is not None else graph(batch)
        # a question asked of a trained graph has no label (-1)
        loss = torch.nn.functional.cross_entropy(out.logits.float(), batch.labels, ignore_index=-1, reduction="sum")
        # the batch's one read of the device (its sync point): every choice's probability, the routing shares and
        # the summed loss, as Python floats
        read = torch.cat([out.logits.float().softmax(-1).reshape(-1), out.routing.float().reshape(-1),
                          loss.reshape(1)]).tolist()
        slots, sources = out.logits.shape[1], out.routing.shape[1]
        total_loss += read[-1]
        shares = read[len(chunk) * slots:-1]
        routing += [shares[b * sources:(b + 1) * sources] for b in range(len(chunk))]
        for b, q in enumerate(chunk):
            p = read[b * slots: b * slots + len(q.choices)]
            pred = max(range(len(p)), key=p.__getitem__)       # the first of equal maxima, as argmax
            predictions.append({"id": q.id, "label": q.label, "prediction": pred,
                                "correct": pred == q.label if q.label >= 0 else None,
                                "probs": [round(x, 5) for x in p]})
    graph.train()
    if ranks.active:        # every rank's slice, in rank order: the questions' order
        parts = gather((predictions, total_loss, routing), ranks)
        predictions = [p for part in parts for p in part[0]]
        total_loss = sum(part[1] for part in parts)
        routing = [r for part in parts for r in part[2]]
    n = sum(p["correct"] is not None for p in predictions)
    correct = sum(bool(p["correct"]) for p in predictions)
    mean_routing = [sum(column) / len(column) for column in zip(*routing)]     # per read node, over the questions
    return EvalResult(correct / max(n, 1), wilson_interval(correct, n), total_loss / max(n, 1), n, mean_routing,
                      predictions)


def predictions_name(tasks: str, split: str) -> str:
    """The predictions file of an evaluation, one flat name whatever the tasks are called (paths, hf:ORG/NAME): the
    characters a file name cannot hold become '_', none at either end (`folder/` gives `predictions-folder-...`)."""
    return f"predictions-{re.sub(r'[^A-Za-z0-9._-]+', '_', tasks).strip('._-') or 'task'}-{split}.jsonl"


def write_predictions(result: EvalResult, path: str | Path) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(p) + "\n" for p in result.predictions))
    return Path(path)
