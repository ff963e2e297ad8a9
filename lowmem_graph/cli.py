"""`lowmem-graph`: train graphs of frozen language models, evaluate and ask them, plan their memory, inspect and
measure them. Mistakes a user can fix print one line and exit 2 (--debug: traceback)."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import warnings

from .commands import (
    cmd_baselines,
    cmd_cache,
    cmd_eval,
    cmd_export,
    cmd_figures,
    cmd_generate,
    cmd_matrix,
    cmd_predict,
    cmd_train,
)
from .errors import Interrupted, UserError
from .preflight import cmd_align, cmd_inspect, cmd_plan, cmd_probe_quant
from .spec import FORMATS, PRESETS
from .trackers import TRACKERS

# Errors of the machine a run writes to, not of our code: said in one line.
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                errno.EEXIST, errno.ENAMETOOLONG}


def _add_graph_args(p):
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", metavar="{" + ",".join(PRESETS) + "}", help="a shipped graph (default: tiny)")
    which.add_argument("--graph", "--config", dest="graph", metavar="FILE",
                       help="a graph in YAML, with its training settings under train: (every TrainConfig field: "
                            "task, epochs, lr, warmup, clip, weight_decay, ...; flags win); a run's config.yaml is one")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change the graph: latent_dim=512, nodes.phi3.blend=0.5, nodes.gemma.quant=int8, "
                        "drop=gemma (repeatable)")
    p.add_argument("--quant", choices=FORMATS, help="frozen weights of every node without its own "
                                                    "(default: the spec's, nf4)")


def _add_training_args(p):
    p.add_argument("--train-split", help="split trained on, for tasks that name none (default: train)")
    p.add_argument("--eval-split", help="split evaluated after each epoch (default: validation)")
    p.add_argument("--limit-train", type=int, help="at most N training questions per task part")
    p.add_argument("--limit-eval", type=int, help="at most N evaluation questions per task part")
    p.add_argument("--allow-test-training", action="store_true",
                   help="train on a test split (refused otherwise: every result measured on it would be contaminated)")
    p.add_argument("--epochs", type=int, help="passes over the training questions (default: the spec's, 3)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: the spec's, 3e-4)")


def _add_output_args(p, name: str):
    p.add_argument("--out", default="runs", help="where run folders go (default: runs/)")
    p.add_argument("--run-dir", help=f"exact run folder, new or empty (default: <out>/{name}-<time>)")


def _training_parser(sub, name: str, help: str):
    """A subcommand that builds a graph and trains it: graph, data and training flags."""
    p = sub.add_parser(name, help=help)
    _add_graph_args(p)
    _add_data_args(p)
    _add_training_args(p)
    return p


def _add_data_args(p):
    p.add_argument("--task", help="arc-challenge, arc-easy, openbookqa, mmlu, a file or folder of your own "
                                  "(question, choices, answer), or hf:ORG/NAME[/CONFIG]; several joined by +; a "
                                  "task's own splits after a colon (mmlu:auxiliary_train,dev)")
    p.add_argument("--columns", help="for hf:ORG/NAME: which columns hold the question, choices and answer "
                                     "(question=q,choices=options.text,labels=options.label,answer=key)")
    p.add_argument("--eval-task", help="tasks evaluated (default: those of --task)")
    p.add_argument("--data-dir", help="official local files of the task (default: the hub; ARC-Easy is bundled)")
    p.add_argument("--batch-size", type=int, help="questions per optimizer step or per evaluation batch "
                                                  "(default: the spec's, 8)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="lowmem-graph", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"lowmem-graph {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a graph (default: the tiny preset on bundled ARC-Easy, CPU-friendly)")
    _add_graph_args(p)
    _add_data_args(p)
    _add_training_args(p)
    p.add_argument("--seed", type=int, help="seed of the trainable parts' initialisation and the data order")
    p.add_argument("--gpu-mem", metavar="SIZE", help="device memory budget, e.g. 24G or 6G: plan what stays resident, "
                                                     "what streams, and the micro-batch (see `lowmem-graph plan`)")
    p.add_argument("--host-mem", metavar="SIZE", help="host memory for --gpu-mem's plan (default: what is available)")
    p.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps")
    p.add_argument("--cache-dir", help="where the prefix cache lives (default: ~/.cache/lowmem-graph/prefix)")
    p.add_argument("--init", choices=["random", "ridge"],
                   help="ridge: start the projections as Ridge maps into an anchor node's principal directions")
    p.add_argument("--init-anchor", metavar="NODE", help="the anchor for --init ridge (default: the first refiner)")
    p.add_argument("--init-from", metavar="RUN", help="a finished run: the edges this graph shares with it start from "
                                                      "its trained weights (add or remove nodes without retraining)")
    p.add_argument("--train-only", choices=["new-edges"],
                   help="with --init-from: train only the edges the run did not have; the shared ones stay frozen")
    p.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after N steps")
    p.add_argument("--objective", choices=["choice", "lm"],
                   help="choice: score answer options (default) | lm: next-token prediction on text, perplexity "
                        "(graphs given by edges; text: openbook-facts, a .txt/.jsonl file or hf:ORG/NAME)")
    p.add_argument("--compare", action="store_true",
                   help="with --objective lm: also each model alone and a learned router over their outputs, "
                        "under the same protocol")
    _add_output_args(p, "<graph>")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--report-to", choices=TRACKERS,
                   help="also log the metrics, settings and memory plan to an experiment tracker (default: none; "
                        "pip install 'lowmem-graph[tensorboard]' or [wandb], [mlflow])")
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="let --resume change batch size, epochs or lr (they reinterpret the step counter)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's trained weights: accuracy with a 95%% interval (an lm run: "
                                    "perplexity, or with --task multiple choice by log-likelihood, lm-evaluation-"
                                    "harness's acc/acc_norm, TruthfulQA MC1/MC2)")
    p.add_argument("run_dir", help="a run folder (runs/<graph>-<time>, as train printed it) or an exported one")
    _add_data_args(p)
    p.add_argument("--split", default="test", help="split evaluated (default: test)")
    p.add_argument("--limit", type=int, help="at most N questions per task part")
    p.add_argument("--out", help="predictions file (default: in the run folder)")
    p.add_argument("--gpu-mem", metavar="SIZE", help="device memory budget (default: the run's own, if it had one)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="ask a trained graph: the chosen answer and every choice's probability")
    p.add_argument("run_dir", help="a run folder, one made by `lowmem-graph export`, or its hub id ORG/NAME")
    p.add_argument("--input", metavar="FILE", help="questions: JSONL or CSV (question, choices, optional answer, "
                                                   "id, context) or ARC's JSONL")
    p.add_argument("--question", help="one question, asked on the command line")
    p.add_argument("--choices", nargs="+", metavar="TEXT", help="its choices (with --question)")
    p.add_argument("--context", help="a passage shown before the question (with --question)")
    p.add_argument("--out", metavar="FILE", help="predictions JSONL (default: in the run folder)")
    p.add_argument("--gpu-mem", metavar="SIZE", help="device memory budget (default: the run's own, if it had one)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, help="questions per forward (default: the run's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("generate", help="an lm run writes after a prompt, through its coupled graph, streamed")
    p.add_argument("run_dir", help="a run folder trained with --objective lm")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--node", help="the node that writes (default: the first the output reads)")
    p.add_argument("--variant", default="coupled", help="coupled (default), or alone/router if the run has them")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most N tokens (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    p.add_argument("--top-k", type=int, help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set holding this mass")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (default: 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeat for several)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the run's)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("cache", help="list the prefix and node caches with their sizes, or clear them")
    p.add_argument("--clear", choices=["prefix", "nodes", "tiny", "llama2c", "all"], help="remove every entry of one kind")
    p.add_argument("--all", action="store_true", help="list every entry (default: the first 20 of each kind)")
    p.add_argument("--cache-dir", help="the cache root (default: $LOWMEM_GRAPH_CACHE or ~/.cache/lowmem-graph)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("export", help="a run as a self-describing folder: config, weights, a model card; or on the "
                                      "Hugging Face hub")
    p.add_argument("run_dir", help="the run folder to export (runs/<graph>-<time>)")
    p.add_argument("out", nargs="?", help="the new folder (optional with --push-to-hub)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the export to this hub repository (made if new; "
                                                             "needs a login: hf auth login, or HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a new repository is private")
    p.add_argument("--license", default="other", help="the licence in the model card's metadata (default: other)")
    p.set_defaults(func=cmd_export)

    p = _training_parser(sub, "matrix", "train ablation variants x seeds and tabulate mean and spread")
    p.add_argument("--vary", action="append", metavar="KEY=V1,V2",
                   help="an axis of the matrix, e.g. nodes.phi3.inject_depth=0.5,0.75 or drop=llama,qwen (repeatable)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    _add_output_args(p, "matrix-<graph>")
    p.set_defaults(func=cmd_matrix)

    p = _training_parser(sub, "baselines", "each node zero-shot (acc, acc_norm, acc_bytes) and as a "
                                           "parameter-matched learned head")
    _add_output_args(p, "baselines-<graph>")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("figures", help="redraw a run's plots: curves, memory, gradient share and routing")
    p.add_argument("run_dir", help="the run folder whose metrics.jsonl is drawn (runs/<graph>-<time>)")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("inspect", help="nodes, widths, injection sites and parameter counts (no download)")
    _add_graph_args(p)
    p.add_argument("--draw", metavar="PNG", help="also draw the graph (nodes, latents, edges, output) into PNG")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="fit a graph to a device memory budget: residency, streaming, micro-batch "
                                    "(no download)")
    _add_graph_args(p)
    p.add_argument("--gpu-mem", required=True, help="device memory budget: 24G, 6GiB, 512M, ... (G = 2**30 bytes)")
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=8,
                   help="examples per optimizer step (default 8)")
    p.add_argument("--seq-len", "--seq", dest="seq", type=int, default=512, help="tokens per example (default 512)")
    p.add_argument("--host-mem", help="host memory to plan for (default: what this machine has available now)")
    p.add_argument("--profile", help="device profile the times are predicted for: a built-in card (rtx3090, rtx4090, "
                                     "rtx5090, a100-40gb, a100-80gb, l4, h100, h200) or a file bench/calibrate.py "
                                     "wrote (default: this machine's measured profile, else rtx4090)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("align", help="how well the nodes' spaces line up: Ridge maps between every pair, held-out R^2 "
                                     "beside a permutation control")
    _add_graph_args(p)
    p.add_argument("--task", help="questions whose states are aligned (default: the spec's training task)")
    p.add_argument("--split", default="train", help="split whose states are aligned (default: train)")
    p.add_argument("--limit", type=int, help="at most N questions per task part")
    p.add_argument("--cross-task", help="a second task: the maps fitted on --task, scored on it")
    p.add_argument("--columns", help="for hf:ORG/NAME tasks: question=...,choices=...,answer=...")
    p.add_argument("--data-dir", help="official local files of the task (default: the hub; ARC-Easy is bundled)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--gpu-mem", metavar="SIZE", help="device memory budget for the frozen pass (as train's)")
    p.add_argument("--seed", type=int, help="seed of the folds and the permutation control")
    _add_output_args(p, "align-<graph>")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("probe-quant", help="what INT8, INT4 and NF4 cost each node: perplexity and hidden-state error "
                                           "against full precision")
    p.add_argument("models", nargs="*", help="model ids or paths (or --preset/--graph for every node of a graph)")
    _add_graph_args(p)
    p.add_argument("--text", help="a UTF-8 file, one text per line (default: the bundled questions and answers)")
    p.add_argument("--limit", type=int, help="at most N texts (default 64 of the bundled ones)")
    p.add_argument("--threshold", type=float, default=10.0, help="flag a node whose NF4 perplexity gap exceeds this "
                                                                  "many percent (default 10)")
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward (default 8)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    _add_output_args(p, "probe-quant")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_probe_quant)

    from .reproduce import add_reproduce_command

    add_reproduce_command(sub)
    for command in sub.choices.values():      # --debug also after the subcommand; SUPPRESS keeps a --debug before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def quiet_warnings() -> None:
    """Hide the libraries' warnings (deprecations, hub notices: noise to a user of the command) but not ours, which
    say something about this run (a slab streamed from pageable memory, a damaged cache rebuilt)."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"lowmem_graph(\.|$)")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")     # read when huggingface_hub loads (it sets its level)
    for name in ("huggingface_hub", "kernels"):    # "Retrying in 8s", "offline mode": our one line says it
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads that wait by sleeping, not spinning, set before torch loads (the parser imports none of it). On
    # a busy machine a spinning thread burns the core its partner needs: on 2 cores beside 4 busy processes the
    # frozen pass over 160 questions took 56 s spinning, 6.8 s sleeping (bench/bench_wait_policy.py, README).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not args.debug:
        quiet_warnings()
    from .distributed import finish
    from .signals import StopSignals

    stop = StopSignals()
    try:
        with stop:          # Ctrl-C and SIGTERM end every command through its clean-ups: no temporary, no half folder
            args.func(args)
        finish()            # under torchrun: the process group ends cleanly
    except UserError as e:
        if args.debug:
            raise
        print(f"lowmem-graph: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"lowmem-graph: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:         # `lowmem-graph cache | head`: the reader left; no traceback, the shell's code
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if args.debug or e.errno not in _ENVIRONMENT:
            raise
        hint = {errno.ENOSPC: " (the disk is full)", errno.EDQUOT: " (disk quota exceeded)",
                errno.EROFS: " (read-only file system)"}.get(e.errno, "")
        print(f"lowmem-graph: error: {e.strerror}{hint}: {e.filename or ''}", file=sys.stderr)
        return 2
    except MemoryError:
        if args.debug:
            raise
        print("lowmem-graph: error: out of host memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowmem-graph: interrupted ({signal.Signals(stop.signum).name})", file=sys.stderr)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
