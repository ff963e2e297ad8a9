"""What a step optimises: an objective turns what the graph gives for a micro-batch into that micro-batch's share of
the step's loss and the figures summed over the step, and evaluates. step.py's schedules, the Trainer, evaluation
and the learned baselines take one; nothing else knows which objective runs.

* `Choice`: the paper's multiple choice. Cross-entropy over the answer slots; the figures: summed loss, number
  correct, summed routing share per read node.
* `NextToken` (`--objective lm`): every node the output reads predicts the text's next tokens through its own
  frozen LM head; the loss is the mean over those nodes of their per-token NLL (each node's NLL summed over the
  step over its tokens in the step), the metric each node's held-out perplexity. Under a variant: the graph
  (coupled), each model alone, or a learned router over the models' outputs (`Router`, Residual Coupling's
  mixture-of-experts baseline).

An objective's `norm` (computed on the host, ahead of the step, from the step's whole batch over every rank) is
what a micro-batch's summed loss is divided by so that the step's gradient is that of the batch's mean.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import transfer
from .align import gather_tokens
from .edge_graph import EdgeGraph, lm_loss
from .errors import UserError
from .nodes import autocast
from .progress import progress as bar

VARIANTS = ("alone", "router", "coupled")


class Choice:
    """Multiple choice over answer slots (the output node's logits)."""
    name = "choice"
    unit = "questions"

    def load(self, cfg) -> tuple[list, list, list[str]]:
        """(training questions, evaluated questions, what to say about them)."""
        from .data import leave_out_trained
        from .settings import load_questions

        cfg.check_splits()
        train = load_questions(cfg.task, cfg.train_split, cfg.data_dir, cfg.limit_train, cfg.columns)
        evaluated = load_questions(cfg.evaluated(), cfg.eval_split, cfg.data_dir, cfg.limit_eval, cfg.columns)
        evals = leave_out_trained(evaluated, train)
        if not train:
            raise UserError(f"no training questions in {cfg.task} {cfg.train_split}")
        if evaluated and not evals:
            raise UserError(f"every question of {cfg.evaluated()} {cfg.eval_split} is also a training question: "
                            "evaluate on another split (--eval-split) or task (--eval-task)")
        said = [f"evaluation: {len(evaluated) - len(evals):,} of the {len(evaluated):,} questions to evaluate are "
                "also training questions and are left out"] if len(evals) < len(evaluated) else []
        return train, evals, said + [f"data: {len(train):,} training questions ({cfg.task}, {cfg.train_split}), "
                                     f"{len(evals):,} evaluated after each epoch ({cfg.evaluated()}, {cfg.eval_split})"]

    def frozen_items(self, questions) -> list[tuple[str, str]]:
        from .questions import format_prompt

        return [(q.id, format_prompt(q)) for q in questions]

    def collate(self, graph, questions, cached: bool = False):
        return graph.collate(questions, cached=cached)

    def norm(self, graph, batches, others) -> None:
        """None: a step's loss is the mean over its questions (the trainer divides by their number)."""
        return None

    def share(self, graph, out, batch, norm: float):
        """(this micro-batch's part of the step's mean loss, for backward; its figures: summed loss in fp64,
        number correct, summed routing share per read node)."""
        labels = batch.labels.to(out.logits.device)
        loss = torch.nn.functional.cross_entropy(out.logits.float(), labels, reduction="sum")
        correct = (out.logits.argmax(-1) == labels).sum()
        return loss / norm, (loss.detach().double(), correct, out.routing.detach().float().sum(0))

    def readout(self, figures, n: int) -> torch.Tensor:
        """The step's summed figures as one fp64 vector to read (the routing share per example already)."""
        loss, correct, routing = figures
        return torch.cat([loss.double().reshape(1), correct.double().reshape(1), (routing / n).double().reshape(-1)])

    def metrics(self, graph, values: list[float], n: int) -> dict:
        return {"loss": values[0] / n, "acc": values[1] / n, "routing": dict(zip(graph.refiners, values[2:]))}


class NextToken:
    """Next-token prediction on text through the read nodes' frozen LM heads, under a variant."""
    name = "lm"

    unit = "passages"

    def __init__(self, variant: str = "coupled"):
        if variant not in VARIANTS:
            raise UserError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
        self.variant = variant

    def load(self, cfg) -> tuple[list, list, list[str]]:
        from .text import load_text

        train = load_text(cfg.task, cfg.train_split, cfg.limit_train, cfg.columns)
        evals = (load_text(cfg.eval_task, "all" if not cfg.eval_task.startswith("hf:") else cfg.eval_split,
                           cfg.limit_eval, cfg.columns) if cfg.eval_task
                 else load_text(cfg.task, cfg.eval_split, cfg.limit_eval, cfg.columns))
        if not train:
            raise UserError(f"no training text in {cfg.task} {cfg.train_split}")
        return train, evals, [f"data: {len(train):,} training passages ({cfg.task}, {cfg.train_split}), "
                              f"{len(evals):,} evaluated ({cfg.eval_task or cfg.task}, {cfg.eval_split}); next-token "
                              f"prediction, variant {self.variant}"]

    def frozen_items(self, items) -> list[tuple[str, str]]:
        return list(items)

    def collate(self, graph, items, cached: bool = False):
        return graph.collate_text([t for _, t in items], [i for i, _ in items])

    def norm(self, graph, batches, others) -> dict[str, float]:
        """Each read node's number of predicted tokens over the step's passages (at least 1): those of this rank's
        micro-batches, already collated, and of the other ranks' passages `others`, tokenized here to be counted
        (each passage of a step is tokenized once)."""
        counted = [*batches, graph.collate_text([t for _, t in others], [i for i, _ in others], masks=False)
                   ] if others else batches
        return {j: float(max(sum(b.picks[j].numel() for b in counted), 1)) for j in graph.reads}

    def share(self, graph, finals, batch, norm: dict):
        """(this micro-batch's part of the step's loss: each node's NLL over the step's tokens of that node,
        averaged over the nodes; its figures: each node's summed NLL (fp64) and number of tokens)."""
        here = next(graph.parameters()).device      # a node on a device of its own sends its loss here
        per_node = {j: tuple(t.to(here) for t in lm_loss(graph.nodes[j], finals[j], batch, j)) for j in graph.reads}
        loss = sum(nll / norm[j] for j, (nll, _) in per_node.items()) / len(per_node)
        return loss, (torch.stack([nll.detach().double() for nll, _ in per_node.values()]),
                      torch.stack([tokens.double() for _, tokens in per_node.values()]))

    def readout(self, figures, n: int) -> torch.Tensor:
        nll, tokens = figures
        return torch.cat([nll.double().reshape(-1), tokens.double().reshape(-1)])

    def metrics(self, graph, values: list[float], n: int) -> dict:
        k = len(graph.reads)
        nll, tokens = values[:k], values[k:2 * k]
        return {"loss": sum(a / max(b, 1) for a, b in zip(nll, tokens)) / k,
                "tokens": dict(zip(graph.reads, (int(t) for t in tokens)))}

    @torch.no_grad()
    def evaluate(self, model, graph, items, batch_size: int, progress=True, desc="eval", states=None,
                 ranks=None) -> dict:
        """Each read node's perplexity over `items` (exp of its mean NLL per token); under several ranks each
        scores whole batches of its slice and the sums are added once (one read at the end)."""
        from .distributed import Ranks, all_sum, shard_batches

        ranks = ranks or Ranks()
        mine = shard_batches(list(items), batch_size, ranks)
        device = next(graph.parameters()).device
        totals = torch.zeros(2 * len(graph.reads), dtype=torch.float64, device=device)
        chunks = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]

        def packed(chunk):      # on another thread, while the batch before computes
            batch = self.collate(graph, chunk)
            return transfer.pack(graph, batch, states.gather(batch) if states is not None else None)

        for made in bar(transfer.ahead(packed, chunks), len(chunks), f"{desc} {self.variant} batch", progress):
            batch, cached = transfer.arrive(made)
            with autocast(device):
                finals = model(batch, cached) if cached is not None else model(batch)
                _, figures = self.share(graph, finals, batch, {j: 1.0 for j in graph.reads})
            totals += self.readout(figures, 0).to(device)
        values = all_sum(totals, ranks).tolist()
        k = len(graph.reads)
        return {j: math.exp(values[i] / max(values[k + i], 1)) for i, j in enumerate(graph.reads)}


def objective_for(cfg, variant: str | None = None):
    """The objective a run's settings name (`objective: choice | lm`); the lm objective under `variant`."""
    return NextToken(variant or "coupled") if cfg.objective == "lm" else Choice()


# ---- the lm objective's variants -------------------------------------------------------------------------------
class Router(nn.Module):
    """The mixture-of-experts baseline over the models' outputs: per token of a model j, a softmax gate (from j's own
    final state) mixes the final states of every model, each other model's mapped into j's width by a learned
    linear map and aligned causally by characters, before j's frozen head (the mixing happens before the output
    projection so that models with different tokenizers can be mixed at all). Each gate starts favouring the
    model's own state (bias 2 on it: 0.88 of the mass with two models), as a bridge starts closed."""

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


class Baseline(nn.Module):
    """A variant other than the coupled graph, as a module whose parameters are what trains: `alone` (each model by
    itself; nothing trains) or `router` (every model by itself, mixed by a Router). Its forward gives each read
    node's final states, as the coupled graph's does; the graph is held outside the module's parameters."""

    def __init__(self, graph: EdgeGraph, variant: str):
        super().__init__()
        object.__setattr__(self, "graph", graph)
        self.variant = variant
        self.router = Router(graph).to(next(graph.parameters()).device) if variant == "router" else None

    def forward(self, batch, *cached):
        return final_states(self.graph, self.variant, batch, self.router)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The router's weights, under the router's own names (weights-router.safetensors)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.router.state_dict().items()}

    def load_trainable(self, state: dict[str, torch.Tensor], source: str) -> None:
        try:
            self.router.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{source}: the router's weights do not fit this graph ({str(e).splitlines()[0]})") \
                from None


def final_states(graph: EdgeGraph, variant: str, batch, router: Router | None = None) -> dict[str, torch.Tensor]:
    """Each read node's final states under a variant: coupled (the graph's own forward), alone (each model by
    itself) or router (every model by itself, mixed by the router)."""
    if variant == "coupled":
        return graph(batch)
    with torch.no_grad():
        needed = graph.nodes if variant == "router" else graph.reads
        finals = {n: graph.nodes[n].final(*batch.tokens[n], (batch.masks or {}).get(n)) for n in needed}
    return router(finals, batch) if variant == "router" else {j: finals[j] for j in graph.reads}


def batch_loss(graph: EdgeGraph, finals: dict[str, torch.Tensor], batch) -> tuple[torch.Tensor, dict]:
    """(the mean over read nodes of their per-token NLL, {node: (summed NLL, tokens)})."""
    here = next(graph.parameters()).device
    per_node = {j: tuple(t.to(here) for t in lm_loss(graph.nodes[j], finals[j], batch, j)) for j in graph.reads}
    loss = sum(nll / tokens.clamp_min(1) for nll, tokens in per_node.values()) / len(per_node)
    return loss, per_node
