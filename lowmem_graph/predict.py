"""Ask a trained graph: load a run folder (or an exported one) and answer multiple-choice questions; export a run as
a self-describing folder (its config, its weights, a model card with its results) that loads back the same way.

    from lowmem_graph import TrainedGraph
    graph = TrainedGraph("runs/tiny-20261202-101500")            # or an exported folder, or its hub id ORG/NAME
    answers = graph.predict([{"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"]}])
    answers[0]["answer"], answers[0]["probs"]                       # "B", {"A": 0.12, "B": 0.88}
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .questions import LETTERS, Question, format_prompt, generic_question
from .errors import UserError
from .files import atomic_dir, atomic_file, file_sha256, save_file

EXPORT_FORMAT = "lowmem-graph-export/1"


def _stderr(*args, **kwargs):
    print(*args, **kwargs, file=sys.stderr)


class TrainedGraph:
    """A run folder's graph with its trained weights, placed as the run's memory plan says (or as `gpu_mem` says).
    `run_dir` may be a hub id ORG/NAME (no local folder of that name): an export pushed there, downloaded."""

    def __init__(self, run_dir: str | Path, gpu_mem: str | None = None, device: str | None = None,
                 batch_size: int | None = None, progress: bool = False, log=_stderr, cache_dir: str | None = None):
        from .runstate import trainable_weights
        from .train import PlacedGraph, TrainConfig, load_run_config

        self.run_dir = graph_folder(run_dir)
        self.spec, cfg = load_run_config(self.run_dir)
        _check_export(self.run_dir)
        if cfg.objective == "lm":
            raise UserError(f"{self.run_dir} was trained on next-token prediction: it scores text, not answer "
                            f"options (lowmem-graph eval {self.run_dir} gives its perplexity)")
        overrides = {k: v for k, v in {"gpu_mem": gpu_mem, "device": device, "batch_size": batch_size,
                                       "cache_dir": cache_dir}.items() if v is not None}
        self.cfg = TrainConfig.from_dict({**asdict(cfg), **overrides})
        weights = trainable_weights(self.run_dir)
        self.progress = progress
        self.placed = PlacedGraph(self.spec, self.cfg, log=log, progress=progress)
        self.placed.graph.load_trainable(weights, str(self.run_dir / "trainable.safetensors"))

    @property
    def refiners(self) -> list[str]:
        return self.placed.graph.refiners

    def evaluate(self, questions: list[Question], desc: str = "eval"):
        """The graph over `questions` (frozen pass first, through the prefix cache), as training evaluates:
        evaluate.EvalResult. Under torchrun each rank scores its slice; every rank gets the one result."""
        from .distributed import current
        from .evaluate import evaluate

        try:
            (states,) = self.placed.frozen_states(questions) if self.placed.cached else (None,)
            self.placed.start_steps()
            return evaluate(self.placed.graph, questions, self.placed.micro_batch, progress=self.progress,
                            desc=desc, states=states, ranks=current())
        finally:
            self.placed.stop_steps()

    def predict(self, questions) -> list[dict]:
        """One record per question (a `Question`, or a dict in the generic format: question, choices, optional
        answer, id, context): the chosen letter and text, every choice's probability, and, when the answer was
        given, whether it was right."""
        asked = [q if isinstance(q, Question) else generic_question(q, f"question {i}", f"q{i}", need_answer=False)
                 for i, q in enumerate(questions)]
        if not asked:
            return []
        result = self.evaluate(asked, "predict")
        records = []
        for q, p in zip(asked, result.predictions):
            record = {"id": q.id, "question": q.question, "choices": list(q.choices),
                      "answer": LETTERS[p["prediction"]], "answer_text": q.choices[p["prediction"]],
                      "probs": dict(zip(LETTERS, p["probs"]))}
            if q.context:
                record["context"] = q.context
            if q.label >= 0:
                record.update(label=LETTERS[q.label], correct=p["correct"])
            records.append(record)
        return records


def graph_folder(ref: str | Path) -> Path:
    """A run folder, an exported one, or an export on the hub by its id ORG/NAME (downloaded; a local folder of that
    name wins)."""
    from .hub import download_graph, is_repo_id

    return download_graph(ref) if is_repo_id(ref) else Path(ref)


def format_answer(record: dict) -> str:
    """A question, every choice with its probability, the chosen one marked."""
    q = Question(record["id"], record["question"], tuple(record["choices"]), -1, context=record.get("context", ""))
    lines = format_prompt(q).splitlines()[:-1]           # without the trailing "Answer:"
    width = max(len(line) for line in lines[-len(q.choices):])
    for i, letter in enumerate(LETTERS[:len(q.choices)]):
        line = lines[len(lines) - len(q.choices) + i]
        mark = ">" if letter == record["answer"] else " "
        lines[len(lines) - len(q.choices) + i] = f"{mark} {line:<{width}}  {record['probs'][letter]:.3f}"
    verdict = ""
    if "label" in record:
        verdict = f"  (right: {record['label']}{', correct' if record['correct'] else ', wrong'})"
    return "\n".join(lines + [f"answer: {record['answer']} ({record['answer_text']}), p = "
                              f"{record['probs'][record['answer']]:.3f}{verdict}"])


def write_jsonl(records: list[dict], path: Path) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---- export ---------------------------------------------------------------------------------------------------
def export_command(args) -> None:
    """`lowmem-graph export RUN [OUT] [--push-to-hub ORG/NAME]`: the folder, then the hub repository; without OUT
    the folder is a temporary one, gone after the upload."""
    from .hub import check_repo_id, push_folder

    repo = args.push_to_hub
    if args.out is None and repo is None:
        raise UserError("give the folder to export into, --push-to-hub ORG/NAME, or both")
    if repo is not None:
        check_repo_id(repo)
    with tempfile.TemporaryDirectory(prefix="lowmem-graph-export-") as tmp:
        out = export_run(args.run_dir, args.out or Path(tmp) / "export", name=repo, license=args.license)
        if args.out is not None:
            print(f"exported {args.run_dir} to {out} (config.yaml, trainable.safetensors, metrics.jsonl, README.md, "
                  "export.json); load it with TrainedGraph or lowmem-graph predict")
        if repo is not None:
            url = push_folder(out, repo, private=args.private)
            print(f"pushed {args.run_dir} to the hub: {url}; load it with TrainedGraph({repo!r}) or lowmem-graph "
                  f"predict {repo}")


def export_run(run_dir: str | Path, out: str | Path, name: str | None = None, license: str = "other") -> Path:
    """A folder that describes itself: config.yaml (graph and training settings), trainable.safetensors (the trained
    weights, a real file), metrics.jsonl, README.md (a model card with the run's results, headed by the metadata the
    hub reads) and export.json (format, version, the weights' SHA-256, checked on load). `name`: what the card tells
    users to load (default: `out`; a hub id when pushed)."""
    from .hub import card_header
    from .runstate import trainable_weights
    from .version import __version__
    from .train import load_run_config

    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise UserError(f"{out} exists: export into a new folder")
    spec, cfg = load_run_config(run_dir)
    _check_export(run_dir)
    weights = trainable_weights(run_dir)                 # checked against their SHA-256, or one line saying why not
    with atomic_dir(out) as tmp:
        shutil.copyfile(run_dir / "config.yaml", tmp / "config.yaml")
        save_file(weights, str(tmp / "trainable.safetensors"))      # a real file, from a legacy run too
        if (run_dir / "metrics.jsonl").is_file():
            shutil.copyfile(run_dir / "metrics.jsonl", tmp / "metrics.jsonl")
        info = {"format": EXPORT_FORMAT, "lowmem_graph": __version__, "source_run": run_dir.name,
                "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "trainable_sha256": file_sha256(tmp / "trainable.safetensors")}
        (tmp / "export.json").write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "README.md").write_text(card_header(spec, cfg, license) +
                                       model_card(spec, cfg, run_dir, tmp / "metrics.jsonl", name or out))
    return out


def _check_export(folder: Path) -> None:
    """An exported folder's weights must be the ones it was exported with."""
    path = folder / "export.json"
    if not path.is_file():
        return
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if info.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path}: format {info.get('format')!r}, this version reads {EXPORT_FORMAT}")
    if file_sha256(folder / "trainable.safetensors") != info.get("trainable_sha256"):
        raise UserError(f"{folder}/trainable.safetensors does not match the SHA-256 in export.json: damaged or "
                        "changed after export")


def model_card(spec, cfg, run_dir: Path, metrics: Path, out: Path) -> str:
    from .runstate import read_metrics
    from .summary import format_description

    epochs = [r for r in read_metrics(metrics) if r.get("kind") == "epoch"] if metrics.is_file() else []
    frozen = "\n".join(f"| {n.name} | {n.role} | `{n.model}`{f' @ {n.revision}' if n.revision else ''} | "
                       f"{n.format(spec.quant)} |" for n in spec.nodes)
    if epochs:
        last = epochs[-1]
        lo, hi = last.get("eval_ci", [float("nan")] * 2)
        results = (f"After epoch {last['epoch']} (step {last['step']}): {cfg.evaluated()} {cfg.eval_split} accuracy "
                   f"**{last['eval_acc']:.3f}** (95% Wilson interval {lo:.3f}-{hi:.3f}, n = {last['eval_n']}), "
                   f"loss {last['eval_loss']:.3f}; training loss {last['train_loss']:.3f}.\n\n"
                   "| epoch | step | train loss | eval acc | eval loss |\n|---|---|---|---|---|\n"
                   + "".join(f"| {r['epoch']} | {r['step']} | {r['train_loss']:.3f} | {r['eval_acc']:.3f} | "
                             f"{r['eval_loss']:.3f} |\n" for r in epochs))
    else:
        results = "No evaluation was recorded for this run.\n"
    passes = f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)}"
    return f"""# {spec.name}: a graph of frozen language models (lowmem-graph)

Exported from run `{run_dir.name}`. Only the projections and the output node were trained; the frozen models below
are loaded from their own sources when this folder is used.

## Frozen nodes

| node | role | model | frozen format |
|---|---|---|---|
{frozen}

## Graph

```
{format_description(spec)}
```

## Training

Task `{cfg.task}` ({cfg.train_split}), {passes}, batch {cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed}.

## Results

{results}
## Use

```bash
lowmem-graph predict {out} --question "Which gas do plants take in?" --choices oxygen "carbon dioxide"
lowmem-graph eval {out} --split test
```

```python
from lowmem_graph import TrainedGraph
graph = TrainedGraph("{out}")
graph.predict([{{"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"]}}])
```
"""
