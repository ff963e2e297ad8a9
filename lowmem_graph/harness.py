"""A trained graph as an lm-evaluation-harness model, `lowmem-graph` in the harness's model registry.

    python -m lowmem_graph.harness --model lowmem-graph --model_args run=RUN --tasks arc_easy

is the harness's own `lm_eval` command with this module imported: the harness (0.4.10 to 0.4.13) knows a model only
by its registry, which imports fill, and reads no plugin entry points, so the plain `lm_eval` command cannot see
it. In Python, `import lowmem_graph.harness` and then `lm_eval.simple_evaluate(model="lowmem-graph", ...)`.
model_args: `run=` a run folder (or an exported one), and for an lm run `node=` (a node the output reads; default
the first) and `variant=` (coupled, alone or router: one the run trained); `batch_size`/`device` as the harness
gives them (default: the run's micro-batch and device).

An lm run (`--objective lm`) answers every request type through the chosen node's frozen head:
* loglikelihood: as lm_choices scores choices, the harness's way (the continuation's tokens are those of the whole
  text after the context's own), with is_greedy (each of them the node's argmax);
* loglikelihood_rolling: the harness's own disjoint windows over the node's tokens (lm_eval.utils, as its HF model
  uses them), each scored as a (context, continuation) pair of text cut at token boundaries (the nodes share text,
  not tokens);
* generate_until: generate.py, greedy unless do_sample, ending at `until` or after max_gen_toks tokens.

A choice run (the multiple-choice objective) gives a probability to each option of a question, not a likelihood to
a text, so it answers multiple_choice tasks only: the harness's requests, one per (context, option), are grouped by
document and context, the group's continuations become the options of one question (the harness's ARC prompt
"Question: ...\\nAnswer:" back into its question), and each option's answer is the log of the graph's probability
for it, so that the harness's argmax (acc) is the graph's choice. acc_norm (divided by lengths) means nothing
there; any other request is refused.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from .errors import UserError

MISSING = "lm-evaluation-harness is not installed: pip install 'lowmem-graph[eval]' (lm_eval 0.4.10 or later)"
try:
    import lm_eval.models  # noqa: F401 (the harness registers its own models only while its registry is empty)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    if __name__ == "__main__":
        print(f"lowmem-graph: error: {MISSING}", file=sys.stderr)
        sys.exit(2)
    raise UserError(MISSING) from None

GEN_TOKENS = 256            # the harness's HF model's max_gen_toks when a task gives none
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed"}
WINDOW_SLACK = 4            # tokens: a window's text, tokenized again on its own, may take a few more


def _stderr(*args, **kwargs):
    print(*args, **kwargs, file=sys.stderr)


@register_model("lowmem-graph")
class GraphLM(LM):
    """A run folder's graph answering the harness's requests (see the module's docstring for what each means)."""

    def __init__(self, run: str, node: str | None = None, variant: str = "coupled", batch_size=None,
                 device: str | None = None, max_batch_size=None, **unknown):     # max_batch_size: batches are fixed
        from .settings import load_run_config

        super().__init__()
        if unknown:
            raise UserError(f"lowmem-graph model_args: unknown {', '.join(sorted(unknown))} (it takes run, node, "
                            "variant, batch_size, device)")
        if batch_size is not None and not str(batch_size).startswith("auto") and not str(batch_size).isdigit():
            raise UserError(f"batch_size={batch_size}: give a whole number or auto (the run's micro-batch)")
        batch = None if batch_size is None or str(batch_size).startswith("auto") else int(batch_size) or None
        if str(device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():       # the harness's command line says cuda:0 unless told otherwise
                _stderr(f"lowmem-graph: no CUDA device for device={device}: running on the CPU")
                device = "cpu"
        spec, cfg = load_run_config(Path(run))
        self.lm = cfg.objective == "lm"
        if not self.lm:
            from .predict import TrainedGraph

            if node is not None or variant != "coupled":
                raise UserError(f"{run} is a choice run, one graph with one answer: node= and variant= are for lm "
                                "runs")
            self.chooser = TrainedGraph(run, device=device, batch_size=batch)
            return
        from .lm import load_lm_run

        reads = list(spec.output.reads)             # checked before the models load
        self.node = node or reads[0]
        if self.node not in reads:
            raise UserError(f"node={self.node}: choose a node the output reads ({', '.join(reads)})")
        self.placed, routers = load_lm_run(Path(run), log=_stderr, progress=False, device=device)
        if variant not in routers:
            raise UserError(f"variant={variant}: {run} trained {', '.join(routers)}")
        self.graph, self.variant, self.router = self.placed.graph, variant, routers[variant]
        self.batch = batch or self.placed.micro_batch

    # ---- the harness's three requests ------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not self.lm:
            return self._choose(requests)
        return self._pairs([r.args for r in requests], [f"{r.task_name} document {r.doc_id}" for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self._lm_only("loglikelihood_rolling")
        pairs, owners = [], []
        for k, r in enumerate(requests):
            windows = self.windows(r.args[0])
            pairs += windows
            owners += [k] * len(windows)
        totals = [0.0] * len(requests)
        names = [f"{requests[k].task_name} document {requests[k].doc_id}" for k in owners]
        for k, (ll, _) in zip(owners, self._pairs(pairs, names)):
            totals[k] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from .generate import generate

        self._lm_only("generate_until")
        out = []
        self.placed.start_steps()
        try:
            for r in requests:
                context, kwargs = r.args
                odd = set(kwargs) - GEN_KWARGS
                if odd:
                    raise UserError(f"generate_until: lowmem-graph cannot honour {', '.join(sorted(odd))} (it takes "
                                    f"{', '.join(sorted(GEN_KWARGS))})")
                until = kwargs.get("until") or ()
                out.append(generate(
                    self.graph, context, self.node, self.variant, self.router,
                    max_new_tokens=int(kwargs.get("max_gen_toks", GEN_TOKENS)),
                    temperature=float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0,
                    top_k=kwargs.get("top_k"), top_p=float(kwargs.get("top_p", 1.0)),
                    stop=(until,) if isinstance(until, str) else tuple(until), seed=int(kwargs.get("seed", 0))))
        finally:
            self.placed.stop_steps()
        return out

    # ---- an lm run -------------------------------------------------------------------------------------------------
    def _pairs(self, pairs: list[tuple[str, str]], names: list[str]) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each (context, continuation), in batches of similar lengths."""
        import torch

        from .nodes import autocast
        from .lm_choices import continuation_logliks, continuation_picks, fitting_counts, split_pair
        from .objectives import final_states

        graph, node = self.graph, self.node
        device = next(graph.parameters()).device
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list = [None] * len(pairs)
        self.placed.start_steps()
        try:
            for start in range(0, len(order), self.batch):
                rows = order[start:start + self.batch]
                contexts, continuations = zip(*(split_pair(*pairs[i]) for i in rows))
                batch = graph.collate_text([c + x for c, x in zip(contexts, continuations)],
                                           [names[i] for i in rows], keep_start=False)
                counts = fitting_counts(graph, node, batch, contexts, continuations, [names[i] for i in rows])
                with torch.no_grad(), autocast(device):
                    final = final_states(graph, self.variant, batch, self.router)[node]
                    lls, greedy = continuation_logliks(graph.nodes[node], final, batch.tokens[node][0],
                                                       continuation_picks(batch.tokens[node][1], counts), True)
                for i, ll, g in zip(rows, lls.tolist(), greedy.tolist()):     # the batch's one read of the device
                    out[i] = (ll, bool(g))
        finally:
            self.placed.stop_steps()
        return out

    def windows(self, text: str) -> list[tuple[str, str]]:
        """`text` as (context, continuation) pairs whose continuations, in order, make it up: the harness's rolling
        windows over the node's tokens, cut after a token's last character (before whitespace: a context ending in
        it would hand it to its continuation as well)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        node = self.graph.nodes[self.node]
        ends = [b for _, b in node.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                ["offset_mapping"]]
        if not ends:
            return []

        def cut(i: int) -> int:         # where token i's text begins
            return 0 if i <= 0 else len(text) if i >= len(ends) else len(text[:ends[i - 1]].rstrip())

        size = node.max_length - len(node.tokenizer(node.spec.prefix)["input_ids"]) - 1 - WINDOW_SLACK
        out = []
        for window in get_rolling_token_windows(list(range(len(ends))), -1, size, 1):
            context, predicted = make_disjoint_window(window)
            first = context[0] if context[0] >= 0 else predicted[0]
            out.append((text[cut(first):cut(predicted[0])], text[cut(predicted[0]):cut(predicted[-1] + 1)]))
        return out

    # ---- a choice run ----------------------------------------------------------------------------------------------
    def _lm_only(self, kind: str) -> None:
        if not self.lm:
            raise UserError(f"{self.chooser.run_dir} is a choice run: it answers multiple_choice tasks only, not "
                            f"{kind} (train with --objective lm for a graph that scores and writes text)")

    def _choose(self, requests) -> list[tuple[float, bool]]:
        """Each multiple-choice document's options, asked as one question: (log of the graph's probability, whether
        it is the graph's answer) per request."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.task_name, r.doc_id, r.args[0]), []).append(i)
        questions, members = [], []
        for (task, doc, context), rows in groups.items():
            where = f"{task} document {doc}"
            if len(rows) < 2 or not context.strip():
                raise UserError(f"{where}: {'one continuation' if context.strip() else 'no context'}: a choice run "
                                "answers multiple_choice tasks only (each option after its question; acc, not "
                                "acc_mutual_info)")
            rows.sort(key=lambda i: requests[i].idx)
            questions.append({**question_of(context), "id": where,
                              "choices": [requests[i].args[1].strip() for i in rows]})
            members.append(rows)
        out: list = [None] * len(requests)
        for record, rows in zip(self.chooser.predict(questions), members):
            probs = list(record["probs"].values())
            chosen = list(record["probs"]).index(record["answer"])
            for k, i in enumerate(rows):
                out[i] = (math.log(probs[k]) if probs[k] > 0 else -math.inf, k == chosen)
        return out


def question_of(context: str) -> dict:
    """The harness's ARC prompt (lm_choices.harness_context: any lines of context, then "Question: ...\\nAnswer:")
    back into its question and context; any other prompt is the question as it stands."""
    body = context.strip()
    if body.endswith("Answer:") and "Question: " in body:
        head, _, question = body[:-len("Answer:")].rpartition("Question: ")
        return {"question": question.strip(), "context": head.strip()}
    return {"question": body}


def main(argv: list[str] | None = None) -> int:
    """`python -m lowmem_graph.harness ARGS`: `lm_eval ARGS` with lowmem-graph registered; a mistake in one line."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    kept = _handlers()
    try:
        cli_evaluate()
    except UserError as e:
        print(f"lowmem-graph: error: {e}", file=sys.stderr)
        return 2
    finally:        # the harness's CLI sets up logging on today's stderr: a caller that goes on must not inherit it
        for logger, handlers in _handlers().items():
            for handler in handlers - kept.get(logger, set()):
                logger.removeHandler(handler)
    return 0


def _handlers() -> dict:
    import logging

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    return {logger: set(logger.handlers) for logger in loggers}


if __name__ == "__main__":
    sys.exit(main())
