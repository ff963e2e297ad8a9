"""Training, for any objective: AdamW on what trains (the graph's maps and output node, or a baseline's router);
everything else stays frozen.

A run folder holds everything needed to understand and resume a run (see runstate.py for the files): it is made
first, with config.yaml, so a run killed at any moment can be resumed; checkpoints carry no pickles; Ctrl-C or
SIGTERM in the training loop finishes the step under way, writes a checkpoint and says how to resume.
The data order of epoch e (0-based) is a permutation seeded by seed * 1009 + e, so a resumed run replays it exactly.
What a step optimises is the objective's (objectives.py): multiple choice, or next-token prediction under a variant
(the coupled graph, each model alone, a learned router: lm.py's --compare runs each through this same loop).
The settings and run folders are settings.py's, the placed graph placed.py's, the signals signals.py's; their names
are importable from here as before.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
from pathlib import Path

import torch
import transformers

from . import distributed, runstate, trackers, transfer
from .errors import Interrupted, UserError
from .evaluate import evaluate
from .files import check_links, remove_stale_temps
from .graph import node_device
from .memory.report import memory_snapshot, out_of_memory_message
from .objectives import Baseline, objective_for
from .placed import PlacedGraph, describe_device
from .settings import (TrainConfig, claim_run_dir, create_run_dir, kept_if_started, load_questions,
                       load_run_config, save_config)
from .signals import StopSignals
from .spec import GraphSpec
from .step import step_gradients

__all__ = ["TrainConfig", "Trainer", "PlacedGraph", "StopSignals", "Interrupted", "train", "load_questions",
           "load_run_config", "save_config", "create_run_dir", "claim_run_dir", "describe_device",
           "projection_grad_norms"]


def _schedule(total_steps: int, warmup: float):
    """Linear warm-up, then cosine decay to 0. Not transformers' get_cosine_schedule_with_warmup: its warm-up
    starts at lr 0, so the first step would change nothing; ours starts at lr / warm-up steps."""
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
    return factor


class Trainer:
    """One run of one objective (and, under the lm objective, one variant): build once, then `fit`. Holds the state
    a checkpoint captures. `placed`: a graph already built and placed for these settings (--compare's variants
    share one)."""

    def __init__(self, spec: GraphSpec, cfg: TrainConfig, run_dir: Path, progress: bool = True, log=print,
                 variant: str | None = None, placed: PlacedGraph | None = None):
        self.spec, self.cfg, self.run_dir, self.progress, self.log = spec, cfg, Path(run_dir), progress, log
        cfg.check_graph(spec)
        trackers.require(cfg.report_to)         # a missing tracker library: one line before anything loads
        self.reporter = None
        self.objective = objective_for(cfg, variant)
        self.variant = getattr(self.objective, "variant", None)         # None: the choice objective
        self.train_set, self.eval_set, said = self.objective.load(cfg)
        log(f"run folder: {self.run_dir}")
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        for line in said[:-1]:
            log(line)
        log(f"{said[-1]}; {self.steps_per_epoch} steps per epoch of {cfg.batch_size}, {cfg.epochs} "
            f"epoch{'s' * (cfg.epochs != 1)}")
        graph_variant = self.variant in (None, "coupled")     # the graph's own step (else a baseline's)
        if cfg.prefix_cache and graph_variant:
            from .tiny import cache_root

            log(f"prefix cache: {cfg.cache_dir or cache_root() / 'prefix'} (lowmem-graph cache lists and clears it)")
        transformers.set_seed(cfg.seed)
        self.placed = placed or PlacedGraph(spec, cfg, log, progress)
        self.graph, self.plan, self.device = self.placed.graph, self.placed.plan, self.placed.device
        self.other_cards = self._other_cards()
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.ranks = distributed.current()
        if self.ranks.active and cfg.batch_size % self.ranks.world:
            raise UserError(f"batch size {cfg.batch_size} does not split over {self.ranks.world} ranks: give a "
                            f"multiple of {self.ranks.world} (the global batch is split across ranks)")
        if self.ranks.active:
            log(f"ranks: {self.ranks.world} processes, each takes {cfg.batch_size // self.ranks.world} questions of "
                f"every batch of {cfg.batch_size}")
        if not graph_variant:
            transformers.set_seed(cfg.seed)
        self.trained = self.graph if graph_variant else Baseline(self.graph, self.variant)   # what trains
        if graph_variant and (cfg.init_from or cfg.train_only or not all(e.train for e in self.graph.topology.edges)):
            from .grow import start_from

            shared, frozen = start_from(self.graph, cfg.init_from, cfg.train_only, self.run_dir, load=False,
                                        write=self.ranks.main)      # its weights: `start`'s, on a run from step 0
            log(f"edges from {cfg.init_from or 'nowhere'}: {len(shared)} start trained; frozen: "
                f"{', '.join(frozen) or 'none'}")
        params = [p for p in self.trained.parameters() if p.requires_grad]
        self.optimizer = self.scheduler = None
        if params:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(self.total_steps, cfg.warmup))
        self.step = 0
        self.epoch_figures = {"losses": [], "accs": []}     # this epoch's steps so far (the checkpoint keeps them)
        self.micro_batch = self.placed.micro_batch
        self.train_states = self.eval_states = None
        if self.placed.cached and graph_variant:
            sets = (self.train_set, self.eval_set)      # questions (as their prompts), or passages
            self.train_states, self.eval_states = (self.placed.frozen_states(*sets) if self.variant is None else
                                                   self.placed.frozen_items(*map(self.objective.frozen_items, sets)))
        self.model = self.trained       # what a step's forward runs through: the trained module, or DDP around it
        if self.ranks.active and params:    # PyTorch's own: parameters broadcast from rank 0, gradients averaged
            self.model = torch.nn.parallel.DistributedDataParallel(self.trained)
        self.stop, self.stop_asked, self.resumed = None, False, False
        if graph_variant:
            self.placed.start_steps()

    def start(self) -> None:
        """Initialise what trains, on a run from step 0 (never over a resumed checkpoint's weights): Ridge maps, then
        the weights of the edges shared with --init-from over them."""
        from .grow import start_from

        if self.cfg.init == "ridge":
            self._ridge_init()
        if self.cfg.init_from and self.variant in (None, "coupled"):
            start_from(self.graph, self.cfg.init_from, self.cfg.train_only, self.run_dir, write=self.ranks.main)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if not self.ranks.main or self.optimizer is None:
            return
        runstate.save_checkpoint(self.run_dir, self.step, self.trained.trainable_state(), self.optimizer.state_dict(),
                                 self.scheduler.state_dict(), self.variant, self.epoch_figures)

    def load_checkpoint(self) -> int:
        """Continue from the run's last checkpoint (or from step 0 if it was stopped before the first one, or if the
        checkpoint is another variant's); the metrics after that step are dropped, since they are replayed."""
        state = runstate.load_checkpoint(self.run_dir)
        self.resumed = state is not None and state.variant == self.variant and self.optimizer is not None
        if self.resumed:
            try:
                self.trained.load_trainable(state.trainable, f"{self.run_dir}/checkpoint")
                runstate.check_optimizer_state(state.optimizer, [p for g in self.optimizer.param_groups
                                                                 for p in g["params"]], f"{self.run_dir}/checkpoint")
                self.optimizer.load_state_dict(state.optimizer)
                self.scheduler.load_state_dict(state.scheduler)
                runstate.set_rng_state(state.rng["json"], state.rng["tensors"])
                if state.epoch is not None:         # an older checkpoint has none: the epoch averages what follows
                    self.epoch_figures = {k: [float(x) for x in state.epoch[k]] for k in ("losses", "accs")}
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise UserError(f"{self.run_dir}: the checkpoint does not fit this run ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:160]})") from None
            self.step = state.step
        if self.ranks.main:
            runstate.keep_metrics_until(self.run_dir / "metrics.jsonl", self.step, self.variant)
        distributed.barrier(self.ranks)
        return self.step

    def _ridge_init(self) -> None:
        """Start the projections aligned (ridge.ridge_init), from the training questions' cached states."""
        from .ridge import pooled_states, ridge_init

        if self.train_states is None:
            raise UserError("init: ridge fits its maps on the prefix cache's states: drop prefix_cache: false")
        states = pooled_states(self.graph, self.train_states, self.train_set)
        anchor = ridge_init(self.graph, states, self.cfg.init_anchor, self.cfg.seed)
        self.log(f"ridge init: the latent is spanned by {anchor}'s leading principal directions; every projection "
                 f"is a Ridge map into it ({len(self.train_set)} questions)")

    def _metric(self, record: dict) -> None:
        if not self.ranks.main:
            return
        record = {"variant": self.variant, **record} if self.variant else record
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.reporter is not None:
            self.reporter.log(record)

    def _other_cards(self) -> tuple[str, ...]:
        """The cards besides the run's that nodes compute on (a node's own `device:`): their peaks are reported."""
        from .memory.placement import _exact

        main = str(_exact(self.device))
        cards = {str(_exact(node_device(n, self.device))) for n in self.spec.nodes}
        return tuple(sorted(c for c in cards if c.startswith("cuda") and c != main))

    # ---- the step -----------------------------------------------------------------------------------------
    def step_inputs(self, items: list) -> tuple:
        """What a step over `items` (the whole step, every rank's share) needs from the host, made ahead on another
        thread by `fit`: this rank's micro-batches, each packed for its one copy to the device (transfer.py) with
        its cached states when it trains from the prefix cache, and the objective's norm of the whole step, per
        rank (DDP averages the ranks' gradients), counted from those same batches (each passage is tokenized once)
        and the other ranks' shares. A rank with no examples (fewer than ranks at an epoch's end) steps with zero
        weight."""
        shares = [distributed.shard(items, dataclasses.replace(self.ranks, rank=r)) for r in range(self.ranks.world)]
        mine = shares[self.ranks.rank]
        idle = not mine
        cached = self.train_states is not None
        mine = mine or items[:1]
        batches = [self.objective.collate(self.graph, mine[start:start + self.micro_batch], cached)
                   for start in range(0, len(mine), self.micro_batch)]
        norm = self.objective.norm(self.graph, batches, [x for r, share in enumerate(shares) for x in share
                                                         if r != self.ranks.rank])
        world = self.ranks.world
        norm = ({k: math.inf if idle else v / world for k, v in norm.items()} if isinstance(norm, dict)
                else math.inf if idle else len(items) / world)
        return ([transfer.pack(self.graph, batch, self.train_states.gather(batch) if cached else None)
                 for batch in batches], norm, idle)

    def train_step(self, items: list, inputs: tuple | None = None) -> dict:
        """One optimizer step over `items`, in micro-batches when the plan asks for them (same gradient). `inputs`:
        what `step_inputs` made for them, ahead of time. Reads the device once (see below)."""
        self.optimizer.zero_grad(set_to_none=True)
        host, norm, idle = inputs if inputs is not None else self.step_inputs(items)
        parts = ((batch, () if states is None else (states,))
                 for batch, states in map(transfer.arrive, host))     # one at a time: two on the device at most
        sums = step_gradients(self.model, parts, norm, self.device, self.placed.placement, self.objective, self.graph)
        if idle:
            sums = tuple(torch.zeros_like(x) for x in sums)
        flag = []
        if self.ranks.active:      # the figures and the stop flag summed over ranks in one collective, unread
            stopping = float(self.stop is not None and self.stop.received is not None)
            flat = torch.cat([x.double().reshape(-1) for x in sums] + [torch.tensor([stopping], dtype=torch.float64,
                                                                                     device=sums[0].device)])
            distributed.all_sum(flat, self.ranks)
            sizes = [x.numel() for x in sums]
            sums = tuple(part.reshape(x.shape) for part, x in zip(flat[:-1].split(sizes), sums))
            flag = [flat[-1:]]
        figures = self.objective.readout(sums, len(items))
        names, norms = _grad_norm_parts(self.trained.router if self.variant == "router" else self.graph)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained.parameters(), self.cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        # The step's one read of the device (its sync point): the objective's figures, each part's gradient norm,
        # the clipped norm and, under ranks, whether any rank was asked to stop, as one vector. The optimizer's
        # step is queued before it, so the device is not left idle waiting for the host.
        here = figures.device
        with the_one_read():
            values = torch.cat([figures, norms.to(here).double(), grad_norm.to(here).double().reshape(1),
                                *(f.to(here) for f in flag)]).tolist()
        k = figures.numel()
        metrics = self.objective.metrics(self.graph, values[:k], len(items))
        part_norms = dict(zip(names, values[k:k + len(names)]))
        if self.ranks.active:
            self.stop_asked = values[-1] > 0
        readers = sum(v for n, v in part_norms.items() if n.startswith("project."))
        matrices = sum(v for n, v in part_norms.items() if n.startswith(("project.", "readout.", "carry.")))
        extra = {"grad_norm": values[k + len(names)], "grad_norms": part_norms,
                 "reader_grad_share": readers / matrices if matrices else 0.0}
        return {**{n: v for n, v in metrics.items() if n != "routing"}, **extra,
                **({"routing": metrics["routing"]} if "routing" in metrics else {})}

    def _stopping(self, stop: StopSignals, collective: bool = False) -> bool:
        """Whether a signal asked the run to stop; under several ranks, whether any rank got one (they stop at the
        same step, so none waits for the others in a collective): between steps, as the last step's read said;
        at an epoch's end (`collective`), asked of every rank."""
        if not self.ranks.active:
            return stop.received is not None
        if not collective:
            return self.stop_asked
        return bool(distributed.all_sum(torch.tensor([float(stop.received is not None)]), self.ranks)[0] > 0)

    def _stop(self, why: str) -> dict:
        self.save_checkpoint()
        self.log(f"{why}: stopped after step {self.step}/{self.total_steps} with a checkpoint; resume with: "
                 f"lowmem-graph train --resume {self.run_dir}")
        return {"stopped_at_step": self.step, "why": why}

    def close(self) -> None:
        self.placed.stop_steps()
        if self.reporter is not None:
            self.reporter, reporter = None, self.reporter
            reporter.close()

    def end_training(self) -> None:
        """Free the gradients and AdamW states (12 B per trainable parameter) when only evaluation follows: a frozen
        pass after training is planned, like the first, with the trainables' weights alone on the device."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.state.clear()

    def evaluate(self):
        """The objective's evaluation of what trained, on the evaluated set (sharded over ranks): an EvalResult
        (multiple choice) or each read node's perplexity (lm)."""
        return evaluate(self.graph, self.eval_set, self.micro_batch, self.progress, "eval", self.eval_states,
                        self.ranks, objective=self.objective, model=self.trained)

    def fit(self, stop: StopSignals | None = None) -> dict:
        """Train from `self.step` to the end, evaluating after each epoch (fit.py's loop). `stop` (installed by
        `train`) ends the loop between steps with a checkpoint."""
        from .fit import fit

        if self.ranks.main and self.reporter is None:       # opened here: a resume's step is known
            self.reporter = trackers.open_reporter(self)
        return fit(self, stop)


@contextlib.contextmanager
def the_one_read():
    """The step's sync point, allowed even under torch.cuda.set_sync_debug_mode (which a test sets to "error" to
    find any other)."""
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def _grad_norm_parts(module) -> tuple[list[str], torch.Tensor]:
    """(each part's name, the gradient norm of each as one fp32 tensor, unread): each projection matrix (W_k of the
    readers, W_j of the refiners; on a graph given by its edges, each edge's map and gate), the output node, or a
    router's maps and gates: the paper's figure of which projections learn."""
    parts = []
    for name, child in module.named_children():
        if isinstance(child, (torch.nn.ModuleDict, torch.nn.ParameterDict)):
            parts += [(f"{name}.{k}", [v] if isinstance(v, torch.nn.Parameter) else list(v.parameters()))
                      for k, v in child.items()]
        elif child is not None:
            parts.append((name, list(child.parameters())))
    norms = []
    for _, params in parts:
        grads = [p.grad.float().norm() for p in params if p.grad is not None]
        norms.append(torch.stack(grads).norm() if grads else torch.zeros(()))
    device = next((n.device for n in norms if n.device.type != "cpu"), torch.device("cpu"))
    return [name for name, _ in parts], torch.stack([n.to(device) for n in norms]) if norms else torch.zeros(0)


def projection_grad_norms(graph) -> dict[str, float]:
    """Each part's gradient norm (see `_grad_norm_parts`), read."""
    names, norms = _grad_norm_parts(graph)
    return dict(zip(names, norms.tolist()))


def train(spec: GraphSpec, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          log=print, variant: str | None = None, placed: PlacedGraph | None = None) -> dict:
    """Train (or resume) a run in `run_dir` (a new run takes an empty folder or makes it). config.yaml is written
    first, so a run killed at any moment resumes: from its last checkpoint, or from step 0. A new run that fails
    before its first checkpoint (bad input, out of memory) leaves no folder behind; an interrupted one (Ctrl-C,
    SIGTERM) keeps it and raises `Interrupted` saying how to resume. `variant`, `placed`: an lm objective's variant,
    on a graph already placed (lm.train_lm runs --compare's variants in one folder, each after the first as
    `resume`: from its own checkpoint, or from step 0)."""
    run_dir = Path(run_dir)
    ranks = distributed.current()
    if not ranks.main:      # rank 0 logs and writes the run folder; the others compute
        log, progress = (lambda *_: None), False
    if ranks.main and resume:
        check_links(run_dir)                    # nothing deleted or written through a link leading out
        for folder in (run_dir, run_dir / runstate.STORE):
            remove_stale_temps(folder)          # what killed writes left
    elif ranks.main:
        claim_run_dir(run_dir)
        with kept_if_started(run_dir, resumable=False):     # a full disk: no folder left without its config
            save_config(run_dir, spec, cfg)
    distributed.barrier(ranks)
    trainer = None
    with contextlib.nullcontext() if resume else kept_if_started(run_dir), StopSignals() as stop:
        try:
            trainer = Trainer(spec, cfg, run_dir, progress, log, variant, placed)   # the frozen pass runs here
            if resume and (trainer.load_checkpoint() or variant is None):
                log(f"resuming {run_dir} at step {trainer.step}/{trainer.total_steps}")
            if not trainer.resumed:
                trainer.start()
            summary = trainer.fit(stop)
        except KeyboardInterrupt:
            at = f"at step {trainer.step}" if trainer is not None else "before training"
            kept = "its last checkpoint is kept" if runstate.has_checkpoint(run_dir) else "it restarts from step 0"
            raise Interrupted(f"interrupted ({signal.Signals(stop.signum).name}) {at}; {kept}: "
                              f"lowmem-graph train --resume {run_dir}", 128 + stop.signum) from None
        except torch.cuda.OutOfMemoryError as e:
            raise UserError(out_of_memory_message(e, getattr(trainer, "plan", None))) from e
        except MemoryError:
            plan = getattr(trainer, "plan", None)
            need = (f"the plan's host figure is {plan.host_peak / 2 ** 30:.2f} GiB" if plan is not None
                    else "without --gpu-mem every node loads whole")
            raise UserError(f"out of host memory ({need}); close other programs, use fewer or smaller nodes, or a "
                            "smaller --batch-size") from None
        finally:
            if trainer is not None:
                trainer.close()
    if "signal" in summary:
        raise Interrupted(f"interrupted ({signal.Signals(summary['signal']).name})", 128 + summary["signal"])
    summary["trainer"] = trainer     # in-process callers (reproduce) evaluate further without reloading
    summary["run_dir"] = str(run_dir)
    summary["memory"] = memory_snapshot(trainer.device, trainer.other_cards)
    return summary
