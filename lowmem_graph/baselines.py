"""The baselines the paper compares against, measured under one protocol on the same eval questions.

- Zero-shot: each constituent model alone, scoring every choice by its log-likelihood as lm-evaluation-harness
  scores ARC, OpenBookQA and MMLU multiple choice (`acc` and `acc_norm`).
- Learned head: one frozen model and a trainable readout + output node, with no readers and no injection, its
  latent width chosen so it trains about as many parameters as the whole graph (so a gain of the graph is not
  just more trainable parameters).
"""
from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import Question
from .errors import UserError
from .evaluate import wilson_interval
from .files import atomic_file
from .nodes import FrozenNode
from .spec import GraphSpec
from .summary import describe
from .train import TrainConfig, load_questions, train

# The harness's arc_easy / arc_challenge template (doc_to_text), followed by target_delimiter " " and the choice.
# Used for every task, so all baselines share one prompt (the harness's own OpenBookQA and MMLU prompts differ).
# No node prefix: the framing text belongs to the graph; a zero-shot baseline sees the plain harness prompt.
CONTEXT = "Question: {stem}\nAnswer:"
DELIMITER = " "


@dataclass
class ZeroShotResult:
    acc: float
    acc_interval: tuple[float, float]
    acc_norm: float
    acc_norm_interval: tuple[float, float]
    n: int
    predictions: list[dict] = field(repr=False)


def _encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """(tokens of context + continuation, how many of them are the continuation's), split as the harness does:
    encode the whole string and the context alone, and score every token after the context's length. A token
    that straddles the boundary thus counts as the continuation's, and the choice is scored as the model would
    tokenize the full text. (The harness first moves trailing spaces of the context onto the continuation; our
    context ends in "Answer:", so there are none.) The tokenizer's own special tokens are kept (a BOS where it
    adds one), so each model sees text framed as in its training; the harness's HF backend adds none unless
    add_bos_token is set (it sets it for Gemma). Long inputs are cut from the left to `max_length`."""
    whole = tokenizer(context + continuation)["input_ids"]
    n_continuation = len(whole) - len(tokenizer(context)["input_ids"])
    if not 0 < n_continuation < max_length:
        raise UserError(f"continuation {continuation!r} has {n_continuation} tokens; it needs 1 to {max_length - 1}")
    return whole[-max_length:], n_continuation


@torch.no_grad()
def _loglikelihoods(node: FrozenNode, pairs: list[tuple[list[int], int]], batch_size: int,
                    progress: bool) -> list[float]:
    """Sum of log p(continuation token | everything before it) for each (tokens, n_continuation) pair.

    Right padding keeps every real token at the position it has alone. Logits are computed only over the span
    of positions that predict some continuation token in the batch (sorting by length keeps it short), since
    the full (batch, length, vocabulary) logits of a 256k-vocabulary model would not fit a small GPU."""
    model, device = node.model, node.device
    pad = node.tokenizer.pad_token_id or 0
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
    scores = [0.0] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc=f"zero-shot {node.spec.name}",
                      disable=None if progress else True, leave=False):
        chunk = order[start:start + batch_size]
        ends = torch.tensor([len(pairs[i][0]) for i in chunk])
        firsts = ends - torch.tensor([pairs[i][1] for i in chunk])    # index of each first continuation token
        ids = torch.full((len(chunk), int(ends.max())), pad)
        for row, i in enumerate(chunk):
            ids[row, : ends[row]] = torch.tensor(pairs[i][0])
        mask = (torch.arange(ids.shape[1]) < ends[:, None]).long()
        span = torch.arange(int(firsts.min()) - 1, int(ends.max()) - 1)   # positions whose logits predict them
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=span.to(device),
                           use_cache=False).logits
        targets = ids[:, span + 1]
        token_lp = logits.float().log_softmax(-1).gather(-1, targets.to(device)[..., None]).squeeze(-1).cpu()
        scored = (span[None] + 1 >= firsts[:, None]) & (span[None] + 1 < ends[:, None])
        for row, i in enumerate(chunk):
            scores[i] = float(token_lp[row][scored[row]].sum())
    return scores


def score_zero_shot(node: FrozenNode, questions: list[Question], batch_size: int = 16,
                    progress: bool = True) -> ZeroShotResult:
    """Zero-shot accuracy of one frozen model: `acc` picks the choice with the highest summed log-likelihood,
    `acc_norm` the highest log-likelihood per UTF-8 byte of the choice text, the delimiter not counted. (The
    harness divides by len(choice), in characters: the same number for ASCII text, which ARC nearly all is.)"""
    pairs = [_encode_pair(node.tokenizer, CONTEXT.format(stem=q.question), DELIMITER + choice, node.max_length)
             for q in questions for choice in q.choices]
    scores = _loglikelihoods(node, pairs, batch_size, progress)
    predictions, start = [], 0
    for question in questions:
        lls, start = scores[start:start + len(question.choices)], start + len(question.choices)
        per_byte = [ll / len(choice.encode("utf-8")) for ll, choice in zip(lls, question.choices)]
        pred, pred_norm = max(range(len(lls)), key=lls.__getitem__), max(range(len(lls)), key=per_byte.__getitem__)
        predictions.append({"id": question.id, "label": question.label, "prediction": pred,
                            "prediction_norm": pred_norm, "correct": pred == question.label,
                            "correct_norm": pred_norm == question.label, "loglikelihoods": lls})
    n = len(predictions)
    correct = sum(p["correct"] for p in predictions)
    correct_norm = sum(p["correct_norm"] for p in predictions)
    return ZeroShotResult(correct / max(n, 1), wilson_interval(correct, n), correct_norm / max(n, 1),
                          wilson_interval(correct_norm, n), n, predictions)


def _trainable(spec: GraphSpec) -> int:
    return sum(describe(spec)[1].values())


def head_baseline_spec(spec: GraphSpec, node_name: str, target_params: int) -> GraphSpec:
    """A graph of `node_name` alone (a refiner with no readers, so nothing is injected) whose latent width, a
    multiple of output.heads, gives the trainable count nearest `target_params` (counted on the meta device).
    The node keeps its framing prefix, so the head reads the same input the node reads in the graph."""
    node = next((n for n in spec.nodes if n.name == node_name), None)
    if node is None:
        raise UserError(f"no node {node_name!r} in graph {spec.name} (nodes: {', '.join(n.name for n in spec.nodes)})")
    heads = spec.output.heads
    base = dataclasses.replace(spec, name=f"{spec.name}-head-{node_name}",
                               nodes=[dataclasses.replace(node, role="refiner")])

    def count(k: int) -> int:
        return _trainable(dataclasses.replace(base, latent_dim=k * heads))

    lo, hi = 1, 1                       # the count grows with the width: bracket the target, then bisect
    while count(hi) < target_params:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target_params else (lo, mid)
    best = min((lo, hi), key=lambda k: abs(count(k) - target_params))
    return dataclasses.replace(base, latent_dim=best * heads)


def _interval(value: float, ci) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def run_baselines(spec: GraphSpec, cfg: TrainConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Zero-shot scores and a parameter-matched learned head for every node of `spec`, on cfg's eval split.
    Writes baselines.md and baselines.json (and head-<node>/ run folders) in `out_dir`; returns baselines.md."""
    out_dir = Path(out_dir)
    taken = [out_dir / f"head-{n.name}" for n in spec.nodes if (out_dir / f"head-{n.name}").exists()]
    if taken:
        raise UserError(f"{taken[0]} already exists: choose another --out")
    tasks = cfg.evaluated()             # the questions train() evaluates the heads on
    questions = load_questions(tasks, cfg.eval_split, cfg.data_dir, cfg.limit_eval)
    if not questions:
        raise UserError(f"no questions in {tasks} {cfg.eval_split}")
    device = cfg.resolved_device()
    target = _trainable(spec)
    rows = []
    for node_spec in spec.nodes:
        node = FrozenNode.load(node_spec, node_spec.format(spec.quant), device, spec.max_length, logits=True)
        zero = score_zero_shot(node, questions, progress=progress)
        del node                        # one frozen model in memory at a time
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with atomic_file(out_dir / f"zero-shot-{node_spec.name}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(p) + "\n" for p in zero.predictions))
        rows.append({"node": node_spec.name, "model": node_spec.model,
                     "zero_shot": {"acc": zero.acc, "acc_ci": list(zero.acc_interval), "acc_norm": zero.acc_norm,
                                   "acc_norm_ci": list(zero.acc_norm_interval), "n": zero.n}})
    for row in rows:
        head = head_baseline_spec(spec, row["node"], target)
        run_dir = out_dir / f"head-{row['node']}"
        summary = train(head, cfg, run_dir, progress=progress)
        row["head"] = {"acc": summary["eval_acc"], "acc_ci": list(summary["eval_ci"]),
                       "trainable_params": _trainable(head), "latent_dim": head.latent_dim, "run_dir": str(run_dir)}
    title = (f"Baselines for graph {spec.name} ({target:,} trainable parameters): {tasks} {cfg.eval_split}, "
             f"n={len(questions)}, accuracy [95% Wilson CI]")
    lines = [title, "",
             "| node | model | zero-shot acc | zero-shot acc_norm | learned-head acc | head trainable params |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        z, h = row["zero_shot"], row["head"]
        lines.append(f"| {row['node']} | {row['model']} | {_interval(z['acc'], z['acc_ci'])} | "
                     f"{_interval(z['acc_norm'], z['acc_norm_ci'])} | {_interval(h['acc'], h['acc_ci'])} | "
                     f"{h['trainable_params']:,} |")
    table = "\n".join(lines) + "\n"
    report = {"graph": spec.name, "graph_trainable_params": target, "task": tasks, "split": cfg.eval_split,
              "n": len(questions), "zero_shot_context": CONTEXT, "zero_shot_delimiter": DELIMITER,
              "train": dataclasses.asdict(cfg), "nodes": rows}
    with atomic_file(out_dir / "baselines.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_file(out_dir / "baselines.md") as tmp:
        tmp.write_text(table)
    print(table)
    return out_dir / "baselines.md"
