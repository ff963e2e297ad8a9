"""Next-token prediction on plain text (`--objective lm`): Residual Coupling's protocol, on graphs given by edges.

Every node the output reads predicts the text's next tokens through its own frozen LM head; the loss is the mean
over those nodes of their per-token NLL, and the metric each node's perplexity on held-out text. Three variants
run under one protocol (same text, steps, learning rate, seed), the comparison the source makes:

* alone: each model by itself, nothing trained;
* router: the source's mixture-of-experts baseline, a learned router over the models' outputs. Per token of a
  model j, a softmax gate (from j's own final state) mixes the final states of every model, each other model's
  mapped into j's width by a learned linear map and aligned causally by characters, before j's frozen head. The
  mixing happens before the output projection so that models with different tokenizers can be mixed at all;
* coupled: the graph's edges (bridges, latents) trained.

Text: the bundled OpenBookQA facts (`openbook-facts`), a .txt file (lines, packed into passages), a .jsonl file
with a "text" field, or hf:ORG/NAME[/CONFIG] (the column `text`, or --columns text=FIELD). A file or the bundled
facts give every tenth passage to `validation` and the rest to `train`; a hub data set has its own splits.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from .align import gather_tokens
from .data import bundled_dir, parse_columns
from .edge_graph import EdgeGraph, lm_loss, target_mask
from .errors import UserError
from .files import atomic_file
from .graph import autocast
from .progress import progress as bar

BUNDLED = {"openbook-facts": "openbook.txt"}
PASSAGE_CHARS = 256          # lines are packed into passages of about this many characters
VARIANTS = ("alone", "router", "coupled")


def load_text(task: str, split: str, limit: int | None = None, columns: str | None = None) -> list[tuple[str, str]]:
    """(id, passage) pairs of a text task's split: "train", "validation", or "all" (a file given for evaluation)."""
    if task.startswith("hf:"):
        return _hub_text(task[3:], split, limit, columns)
    if task in BUNDLED:
        path = bundled_dir() / BUNDLED[task]
    else:
        path = Path(task).expanduser()
        if not path.is_file():
            raise UserError(f"text task {task!r}: no such file (give a .txt or .jsonl file, hf:ORG/NAME, or "
                            f"{', '.join(BUNDLED)})")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict) or not isinstance(r.get("text"), str)),
                   None)
        if bad is not None:
            raise UserError(f"{path}: line {bad + 1}: expected an object with a \"text\" string")
        lines = [r["text"] for r in rows]
    else:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    passages = pack(lines)
    if not passages:
        raise UserError(f"{path}: no text")
    if split not in ("train", "validation", "all"):
        raise UserError(f"{task}: a text file has the splits train and validation (every tenth passage), got "
                        f"{split!r}")
    items = [(f"{path.stem}:{i}", p) for i, p in enumerate(passages)
             if split == "all" or (i % 10 == 9) == (split == "validation")]
    return items[:limit] if limit else items


def pack(lines: list[str], chars: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive non-empty lines joined into passages of about `chars` characters (a line is never cut); a
    line in double quotes (OpenBookQA's facts) loses them."""
    passages, current = [], ""
    for line in lines:
        line = line.strip()
        if len(line) >= 2 and line[0] == line[-1] == '"':
            line = line[1:-1].strip()
        if not line:
            continue
        current = f"{current} {line}" if current else line
        if len(current) >= chars:
            passages.append(current)
            current = ""
    return passages + ([current] if current else [])


def _hub_text(ref: str, split: str, limit: int | None, columns: str | None) -> list[tuple[str, str]]:
    from .data import _dotted, _hub_rows

    parts = ref.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"hf:{ref}: expected hf:ORG/NAME or hf:ORG/NAME/CONFIG")
    field = parse_columns(columns).get("text", "text") if columns else "text"
    rows = _hub_rows("/".join(parts[:2]), parts[2] if len(parts) == 3 else None, split)
    items = [(f"{ref}:{split}:{i}", str(_dotted(row, field, f"hf:{ref} row {i}"))) for i, row in enumerate(rows)]
    items = [item for item in items if item[1].strip()]
    return items[:limit] if limit else items


class Router(nn.Module):
    """The mixture-of-experts baseline over the models' outputs (see the module's docstring). Each gate starts
    favouring the model's own state (bias 2 on it: 0.88 of the mass with two models), as a bridge starts closed."""

    def __init__(self, graph: EdgeGraph):
        super().__init__()
        self.names, self.targets = list(graph.nodes), list(graph.reads)
        width = {n: node.width for n, node in graph.nodes.items()}
        self.maps = nn.ModuleDict({f"{k}-{j}": nn.Linear(width[k], width[j], bias=False)
                                   for j in self.targets for k in self.names if k != j})
        self.gates = nn.ModuleDict({j: nn.Linear(width[j], len(self.names)) for j in self.targets})
        for j, gate in self.gates.items():
            nn.init.zeros_(gate.weight)
            with torch.no_grad():
                gate.bias.zero_()
                gate.bias[self.names.index(j)] = 2.0

    def forward(self, finals: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        mixed = {}
        for j in self.targets:
            here = self.gates[j].weight.device
            own = finals[j].float().to(here)
            experts = [own if k == j else self.maps[f"{k}-{j}"](
                gather_tokens(finals[k].float(), batch.align[(k, j)]).to(here)) for k in self.names]
            weights = self.gates[j](own).softmax(-1)                              # (B, T, K)
            mixed[j] = (torch.stack(experts, -1) * weights[..., None, :]).sum(-1).to(finals[j].device)
        return mixed


def final_states(graph: EdgeGraph, variant: str, batch, router: Router | None = None,
                 states=None) -> dict[str, torch.Tensor]:
    """Each read node's final states under a variant: coupled (the graph; from the prefix cache's `states` when
    given), alone (each model by itself) or router (every model by itself, mixed by the router)."""
    if variant == "coupled":
        return graph(batch, *states.for_batch(graph, batch)) if states is not None else graph(batch)
    with torch.no_grad():
        needed = graph.nodes if variant == "router" else graph.reads
        finals = {n: graph.nodes[n].final(*batch.tokens[n]) for n in needed}
    return router(finals, batch) if variant == "router" else {j: finals[j] for j in graph.reads}


def batch_loss(graph: EdgeGraph, finals: dict[str, torch.Tensor], batch) -> tuple[torch.Tensor, dict]:
    """(the mean over read nodes of their per-token NLL, {node: (summed NLL, tokens)})."""
    here = next(graph.parameters()).device       # a node on a device of its own sends its loss here
    per_node = {j: tuple(t.to(here) for t in lm_loss(graph.nodes[j], finals[j], batch, j)) for j in graph.reads}
    loss = sum(nll / tokens.clamp_min(1) for nll, tokens in per_node.values()) / len(per_node)
    return loss, per_node


@torch.no_grad()
def perplexity(graph: EdgeGraph, variant: str, texts, batch_size: int, router=None, progress=True,
               states=None) -> dict:
    """Each read node's perplexity over `texts` (exp of its mean NLL per token)."""
    device = next(graph.parameters()).device
    totals = {j: [0.0, 0] for j in graph.reads}
    starts = range(0, len(texts), batch_size)
    for start in bar(starts, len(starts), f"eval {variant} batch", progress):
        chunk = texts[start:start + batch_size]
        batch = graph.collate_text([t for _, t in chunk], [i for i, _ in chunk])
        with autocast(device):
            _, per_node = batch_loss(graph, final_states(graph, variant, batch, router, states), batch)
        for j, (nll, tokens) in per_node.items():
            totals[j][0] += float(nll)
            totals[j][1] += int(tokens)
    return {j: math.exp(nll / max(n, 1)) for j, (nll, n) in totals.items()}


def fit(graph: EdgeGraph, variant: str, train, evals, cfg, log=print, progress=True, stop=None,
        metrics: Path | None = None, states=(None, None), micro_batch: int | None = None) -> dict:
    """Train a variant's parameters (none for alone) on `train`, evaluating on `evals` after each epoch. `states`:
    the frozen pass over each (the coupled graph then runs each node from its lowest written layer up).
    `micro_batch` (a memory plan's): each step's passages in micro-batches, gradients summed to the batch's."""
    train_states, eval_states = states
    from .train import _schedule

    device = next(graph.parameters()).device
    router = None
    if variant == "router":
        torch.manual_seed(cfg.seed)
        router = Router(graph).to(device)
    params = [] if variant == "alone" else list((router or graph).parameters())
    result = {"variant": variant, "trainable": sum(p.numel() for p in params), "epochs": []}
    if not params:
        result["perplexity"] = perplexity(graph, variant, evals, cfg.batch_size, progress=progress)
        log(f"{variant}: perplexity {_fmt(result['perplexity'])}")
        _append(metrics, {"variant": variant, "epoch": 0, "perplexity": result["perplexity"]})
        return result
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps_per_epoch * cfg.epochs, cfg.warmup))
    step, started = 0, time.time()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        losses = []
        for s in bar(range(steps_per_epoch), steps_per_epoch, f"{variant} epoch {epoch} step", progress):
            if stop is not None:
                stop.in_loop = True
            chunk = [train[i] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
            micro = micro_batch or len(chunk)
            batches = [graph.collate_text([t for _, t in chunk[m:m + micro]], [i for i, _ in chunk[m:m + micro]])
                       for m in range(0, len(chunk), micro)]
            counts = {j: sum(int(target_mask(graph.nodes[j], b, j).sum()) for b in batches) for j in graph.reads}
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for batch in batches:           # the batch's mean per-token NLL, summed over its micro-batches
                with autocast(device):
                    _, per_node = batch_loss(graph, final_states(graph, variant, batch, router, train_states), batch)
                    loss = sum(nll / max(counts[j], 1) for j, (nll, _) in per_node.items()) / len(per_node)
                loss.backward()
                step_loss += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(step_loss)
            _append(metrics, {"variant": variant, "step": step, "loss": losses[-1]})
            if stop is not None:
                stop.in_loop = False
                if stop.received is not None:
                    result["interrupted_at_step"] = step
                    break
        ppl = perplexity(graph, variant, evals, cfg.batch_size, router, progress, eval_states)
        result["epochs"].append({"epoch": epoch, "train_loss": sum(losses) / max(len(losses), 1), "perplexity": ppl})
        _append(metrics, {"variant": variant, "epoch": epoch, "perplexity": ppl,
                          "train_loss": result["epochs"][-1]["train_loss"], "seconds": round(time.time() - started, 1)})
        log(f"{variant} epoch {epoch}: train loss {result['epochs'][-1]['train_loss']:.3f}, perplexity {_fmt(ppl)}")
        if "interrupted_at_step" in result:
            break
    result["perplexity"] = result["epochs"][-1]["perplexity"]
    result["steps"] = step
    result["state"] = {k: v.detach().cpu() for k, v in (router or graph).state_dict().items()}
    if variant == "coupled":
        result["gates"] = {k: float(torch.sigmoid(g.detach())) for k, g in graph.gate.items()}
    return result


def _fmt(ppl: dict) -> str:
    return ", ".join(f"{j} {v:.2f}" for j, v in ppl.items())


def _append(path: Path | None, record: dict) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def train_lm(spec, cfg, run_dir: str | Path, variants=("coupled",), progress: bool = True, log=print) -> dict:
    """Train the graph on next-token prediction (and, with more `variants`, the baselines under the same
    protocol) in `run_dir`: config.yaml, metrics.jsonl, lm-results.json, weights-<variant>.safetensors,
    lm-curves.png and, when more than one variant ran, lm-comparison.png."""
    from safetensors.torch import save_file

    from .tiny import cache_root
    from .train import Interrupted, PlacedGraph, StopSignals, claim_run_dir, save_config

    if not spec.by_edges:
        raise UserError(f"the lm objective runs on graphs given by their edges; {spec.name} has the paper's shape "
                        "(see examples/residual_coupling.yaml)")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UserError(f"unknown variant {bad[0]!r} (choose from {', '.join(VARIANTS)})")
    run_dir = claim_run_dir(run_dir)
    save_config(run_dir, spec, cfg)
    train = load_text(cfg.task, cfg.train_split, cfg.limit_train, cfg.columns)
    evals = (load_text(cfg.eval_task, "all" if not cfg.eval_task.startswith("hf:") else cfg.eval_split,
                       cfg.limit_eval, cfg.columns) if cfg.eval_task
             else load_text(cfg.task, cfg.eval_split, cfg.limit_eval, cfg.columns))
    log(f"run folder: {run_dir}")
    log(f"data: {len(train):,} training passages ({cfg.task}, {cfg.train_split}), {len(evals):,} evaluated "
        f"({cfg.eval_task or cfg.task}, {cfg.eval_split}); next-token prediction; variants {', '.join(variants)}")
    if cfg.objective != "lm":
        cfg = dataclasses.replace(cfg, objective="lm")
    if cfg.gpu_mem and set(variants) - {"coupled"}:
        raise UserError("--compare with --gpu-mem: the baselines run every model whole on the device; compare "
                        "without a memory plan, or train the coupled graph alone under it")
    placed = PlacedGraph(spec, cfg, log, progress)      # loads the nodes (on the host under a plan)
    graph = placed.graph
    metrics = run_dir / "metrics.jsonl"
    states = (None, None)
    if placed.cached and "coupled" in variants:
        log(f"prefix cache: {cfg.cache_dir or cache_root() / 'prefix'} (each node's layers below its lowest edge in)")
        states = tuple(placed.frozen_items(train, evals))
    results = {}
    with StopSignals() as stop:
        try:
            for variant in variants:
                if variant == "coupled":
                    placed.start_steps()
                try:
                    result = fit(graph, variant, train, evals, cfg, log, progress, stop, metrics, states,
                                 placed.micro_batch)
                finally:
                    placed.stop_steps()
                state = result.pop("state", None)
                if state:
                    save_file({k: v.contiguous() for k, v in state.items()}, str(run_dir / f"weights-{variant}.safetensors"))
                results[variant] = result
                if "interrupted_at_step" in result:
                    break
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; the variants that finished are in {run_dir}", 130) from None
        finally:
            if results:
                with atomic_file(run_dir / "lm-results.json") as tmp:
                    tmp.write_text(json.dumps(results, indent=1))
    plot_lm_curves(metrics, run_dir / "lm-curves.png", spec.name)
    if len(results) > 1:
        plot_comparison(results, run_dir / "lm-comparison.png", spec.name)
    return results


def comparison_table(results: dict) -> str:
    """One line per variant: trainable parameters and each node's perplexity."""
    nodes = list(next(iter(results.values()))["perplexity"])
    lines = [f"{'variant':<9} {'trainable':>10}  " + "  ".join(f"{n + ' ppl':>14}" for n in nodes)]
    for variant, r in results.items():
        lines.append(f"{variant:<9} {r['trainable']:>10,}  " + "  ".join(f"{r['perplexity'][n]:>14.2f}" for n in nodes))
    return "\n".join(lines)


def plot_comparison(results: dict, path: Path, name: str) -> Path:
    """Held-out perplexity per node and variant, as bars from zero (lower is better)."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    nodes = list(next(iter(results.values()))["perplexity"])
    fig, ax = plt.subplots(figsize=(2.4 + 2.2 * len(nodes), 4.0))
    width = 0.8 / len(results)
    for k, (variant, r) in enumerate(results.items()):
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(nodes))]
        bars = ax.bar(xs, [r["perplexity"][n] for n in nodes], width, label=f"{variant} ({r['trainable']:,} trained)")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(nodes)), nodes)
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_ylim(0, 1.15 * max(r["perplexity"][n] for r in results.values() for n in nodes))
    ax.set_title(f"{name}: next-token prediction, same text, steps and seed", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(results), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def plot_lm_curves(metrics: Path, path: Path, name: str) -> Path:
    """Each variant's training loss per step and held-out perplexity per epoch, from a run's metrics.jsonl."""
    from .plots import _pyplot, _save

    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    plt = _pyplot()
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, variant in enumerate(dict.fromkeys(r["variant"] for r in records)):
        steps = [r for r in records if r["variant"] == variant and "loss" in r]
        epochs = [r for r in records if r["variant"] == variant and "perplexity" in r]
        if steps:
            ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], color=f"C{k}", label=variant)
        for n, node in enumerate(epochs[0]["perplexity"] if epochs else []):
            ax_ppl.plot([r["epoch"] for r in epochs], [r["perplexity"][node] for r in epochs], marker="o",
                        color=f"C{k}", ls=("-", "--", ":")[n % 3], label=f"{variant}: {node}")
    ax_loss.set(xlabel="step", ylabel="training loss (mean NLL per token)", title="training")
    ax_ppl.set(xlabel="epoch (0: untrained)", ylabel="held-out perplexity", title="held-out text")
    ax_ppl.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax_loss.legend(fontsize=7)
    ax_ppl.legend(fontsize=7)
    fig.suptitle(f"{name}: next-token prediction", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def evaluate_run(run_dir: Path, split: str, limit: int | None = None, progress: bool = True, log=print) -> dict:
    """A finished lm run's coupled graph, its trained weights loaded, over a split of its text: perplexity per
    read node."""
    from safetensors.torch import load_file

    from .train import PlacedGraph, load_run_config

    weights = Path(run_dir) / "weights-coupled.safetensors"
    if not weights.is_file():
        raise UserError(f"{run_dir} has no weights-coupled.safetensors (did its coupled variant finish?)")
    spec, cfg = load_run_config(Path(run_dir))
    texts = load_text(cfg.eval_task or cfg.task, split, limit, cfg.columns)
    placed = PlacedGraph(spec, cfg, log, progress)
    placed.graph.load_trainable(load_file(str(weights)), str(weights))
    try:
        placed.start_steps()
        return perplexity(placed.graph, "coupled", texts, placed.micro_batch, progress=progress)
    finally:
        placed.stop_steps()
