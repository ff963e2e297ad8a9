"""The baselines the paper compares against, measured under one protocol on the same eval questions.

- Zero-shot: each constituent model alone, scoring every choice by its log-likelihood as lm-evaluation-harness
  scores ARC, OpenBookQA and MMLU multiple choice, under the harness's metric names: `acc` (summed
  log-likelihood), `acc_norm` (per character of the choice) and `acc_bytes` (per UTF-8 byte).
- Learned head: one frozen model and a trainable readout + output node, with no readers and no injection, its
  latent width chosen so it trains about as many parameters as the whole graph (so a gain of the graph is not
  just more trainable parameters).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import leave_out_trained

from .questions import Question
from .errors import UserError
from .evaluate import wilson_interval
from .files import atomic_file
from .nodes import FrozenNode, node_device
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
    acc: float                          # the harness's names: argmax of the summed log-likelihood,
    acc_interval: tuple[float, float]
    acc_norm: float                     # of the log-likelihood per character of the choice,
    acc_norm_interval: tuple[float, float]
    acc_bytes: float                    # and per UTF-8 byte of the choice
    acc_bytes_interval: tuple[float, float]
    n: int
    dtype: str                          # what the scoring forward computed its logits in, e.g. "float32"
    predictions: list[dict] = field(repr=False)


def _encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """(the harness's window of context + continuation tokens, how many of them are the continuation's).

    Split as lm-evaluation-harness's HF backend does (`_encode_pair`): trailing spaces of the context move onto
    the continuation; the context is encoded alone, the continuation's tokens are those of the whole string
    after the context's length (a token that straddles the boundary thus counts as the continuation's, and the
    choice is scored as the model would tokenize the full text), and the two lists are joined. Each encoding
    keeps the tokenizer's own special tokens (a BOS where the tokenizer adds one, none where it does not):
    current harness releases do the same, leaving BOS to the tokenizer unless add_bos_token is passed (and
    adding none to a string that already starts with the BOS text, which our "Question: ..." never does).

    The window is cut as `_loglikelihood_tokens` cuts it: the last max_length + 1 tokens, of which the model is
    fed all but the last (`(context_enc + continuation_enc)[-(max_length + 1):][:-1]`), each fed token
    predicting the next; a continuation may take up to max_length tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_enc = tokenizer(context)["input_ids"]
    continuation_enc = tokenizer(context + continuation)["input_ids"][len(context_enc):]
    if not context_enc or not 0 < len(continuation_enc) <= max_length:
        raise UserError(f"{context!r} + {continuation!r}: the context has {len(context_enc)} tokens and the "
                        f"continuation {len(continuation_enc)}; they need 1 or more and 1 to {max_length}")
    return (context_enc + continuation_enc)[-(max_length + 1):], len(continuation_enc)


def _no_autocast(device: torch.device):
    """Turn off any autocast on `device`, so a forward computes in the weights' own dtype (fp32 stays fp32)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@torch.no_grad()
def _loglikelihoods(node: FrozenNode, pairs: list[tuple[list[int], int]], batch_size: int,
                    progress: bool) -> tuple[list[float], torch.dtype | None]:
    """(sum of log p(continuation token | everything before it) for each (window, n_continuation) pair from
    `_encode_pair`, the dtype of the logits).

    The model is fed each window but its last token, as the harness feeds it. Right padding keeps every real
    token at the position it has alone. Logits are computed only over the span of positions that predict some
    continuation token in the batch (sorting by length keeps it short), since the full (batch, length,
    vocabulary) logits of a 256k-vocabulary model would not fit a small GPU. The forward runs with autocast off,
    in the dtype the node was loaded in (fp32 weights score in fp32, bf16 in bf16, 4-bit in its compute dtype);
    the log-softmax is taken in fp32."""
    model, device = node.model, node.device
    pad = node.tokenizer.pad_token_id or 0
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
    scores, dtype = [0.0] * len(pairs), None
    for start in tqdm(range(0, len(order), batch_size), desc=f"zero-shot {node.spec.name}",
                      disable=None if progress else True, leave=False):
        chunk = order[start:start + batch_size]
        ends = torch.tensor([len(pairs[i][0]) - 1 for i in chunk])     # tokens fed: the window but its last
        firsts = ends - torch.tensor([pairs[i][1] for i in chunk])      # fed position predicting the first
        ids = torch.full((len(chunk), int(ends.max())), pad)            # continuation token
        targets = torch.full_like(ids, pad)                             # the token each fed position predicts
        for row, i in enumerate(chunk):
            ids[row, : ends[row]] = torch.tensor(pairs[i][0][:-1])
            targets[row, : ends[row]] = torch.tensor(pairs[i][0][1:])
        mask = (torch.arange(ids.shape[1]) < ends[:, None]).long()
        span = torch.arange(int(firsts.min()), int(ends.max()))        # positions whose logits predict them
        with _no_autocast(device):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=span.to(device),
                           use_cache=False).logits
        dtype = logits.dtype
        token_lp = logits.float().log_softmax(-1).gather(-1, targets[:, span].to(device)[..., None]).squeeze(-1).cpu()
        scored = (span[None] >= firsts[:, None]) & (span[None] < ends[:, None])
        for row, i in enumerate(chunk):
            scores[i] = float(token_lp[row][scored[row]].sum())
    return scores, dtype


def harness_predictions(lls: list[float], choices) -> tuple[int, int, int]:
    """The choices `acc`, `acc_norm` and `acc_bytes` pick, as the harness's multiple_choice process_results picks
    them: the highest log-likelihood, the highest per character of the choice, the highest per UTF-8 byte (the
    choice text without the delimiter; the first one on a tie, as np.argmax)."""
    def best(values):
        return max(range(len(values)), key=values.__getitem__)

    def per(size):      # an empty choice is never picked (numpy's ll / 0 is -inf)
        return best([ll / size(c) if c else -float("inf") for ll, c in zip(lls, choices)])

    return best(lls), per(len), per(lambda c: len(c.encode("utf-8")))


def score_zero_shot(node: FrozenNode, questions: list[Question], batch_size: int = 16,
                    progress: bool = True) -> ZeroShotResult:
    """Zero-shot accuracy of one frozen model under the harness's metric names: `acc` picks the choice with the
    highest summed log-likelihood, `acc_norm` the highest log-likelihood per character of the choice text and
    `acc_bytes` per UTF-8 byte, the delimiter not counted (the two agree on ASCII text, which ARC nearly all
    is). Scored in the dtype the node was loaded in, never under autocast (see `_loglikelihoods`)."""
    pairs = [_encode_pair(node.tokenizer, CONTEXT.format(stem=q.question), DELIMITER + choice, node.max_length)
             for q in questions for choice in q.choices]
    scores, dtype = _loglikelihoods(node, pairs, batch_size, progress)
    predictions, start = [], 0
    for question in questions:
        lls, start = scores[start:start + len(question.choices)], start + len(question.choices)
        pred, pred_norm, pred_bytes = harness_predictions(lls, question.choices)
        predictions.append({"id": question.id, "label": question.label, "prediction": pred,
                            "prediction_norm": pred_norm, "prediction_bytes": pred_bytes,
                            "correct": pred == question.label, "correct_norm": pred_norm == question.label,
                            "correct_bytes": pred_bytes == question.label, "loglikelihoods": lls})
    n = len(predictions)
    counts = [sum(p[key] for p in predictions) for key in ("correct", "correct_norm", "correct_bytes")]
    (acc, acc_ci), (norm, norm_ci), (per_byte, per_byte_ci) = [(k / max(n, 1), wilson_interval(k, n)) for k in counts]
    return ZeroShotResult(acc, acc_ci, norm, norm_ci, per_byte, per_byte_ci, n,
                          str(dtype).removeprefix("torch.") if dtype is not None else "", predictions)


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
    tasks = cfg.evaluated()             # the questions train() evaluates the heads on (those it trains on left out)
    questions = leave_out_trained(load_questions(tasks, cfg.eval_split, cfg.data_dir, cfg.limit_eval),
                                  load_questions(cfg.task, cfg.train_split, cfg.data_dir, cfg.limit_train, cfg.columns))
    if not questions:
        raise UserError(f"no questions in {tasks} {cfg.eval_split}")
    device = cfg.resolved_device()
    target = _trainable(spec)
    rows = []
    for node_spec in spec.nodes:
        node = FrozenNode.load(node_spec, node_spec.format(spec.quant), node_device(node_spec, device),
                               spec.max_length, logits=True)
        zero = score_zero_shot(node, questions, progress=progress)
        del node                        # one frozen model in memory at a time
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with atomic_file(out_dir / f"zero-shot-{node_spec.name}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(p) + "\n" for p in zero.predictions))
        rows.append({"node": node_spec.name, "model": node_spec.model,
                     "zero_shot": {"acc": zero.acc, "acc_ci": list(zero.acc_interval), "acc_norm": zero.acc_norm,
                                   "acc_norm_ci": list(zero.acc_norm_interval), "acc_bytes": zero.acc_bytes,
                                   "acc_bytes_ci": list(zero.acc_bytes_interval), "n": zero.n,
                                   "dtype": zero.dtype}})
    for row in rows:
        head = head_baseline_spec(spec, row["node"], target)
        run_dir = out_dir / f"head-{row['node']}"
        summary = train(head, cfg, run_dir, progress=progress)
        row["head"] = {"acc": summary["eval_acc"], "acc_ci": list(summary["eval_ci"]),
                       "trainable_params": _trainable(head), "latent_dim": head.latent_dim, "run_dir": str(run_dir)}
    title = (f"Baselines for graph {spec.name} ({target:,} trainable parameters): {tasks} {cfg.eval_split}, "
             f"n={len(questions)}, accuracy [95% Wilson CI]; zero-shot under lm-evaluation-harness's names: acc_norm "
             f"per character of the choice, acc_bytes per UTF-8 byte")
    lines = [title, "",
             "| node | model | zero-shot acc | zero-shot acc_norm | zero-shot acc_bytes | learned-head acc | "
             "head trainable params |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        z, h = row["zero_shot"], row["head"]
        lines.append(f"| {row['node']} | {row['model']} | {_interval(z['acc'], z['acc_ci'])} | "
                     f"{_interval(z['acc_norm'], z['acc_norm_ci'])} | {_interval(z['acc_bytes'], z['acc_bytes_ci'])} | "
                     f"{_interval(h['acc'], h['acc_ci'])} | {h['trainable_params']:,} |")
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
