"""Training: AdamW on the projections and output node only; everything else stays frozen.

A run folder holds everything needed to understand and resume a run (see runstate.py for the files): it is made
first, with config.yaml, so a run killed at any moment can be resumed; checkpoints carry no pickles; Ctrl-C or
SIGTERM in the training loop finishes the step under way, writes a checkpoint and says how to resume.
The data order of epoch e is a permutation seeded by (seed, e), so a resumed run replays it exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml
from tqdm.auto import tqdm

from . import runstate
from .data import Question, format_prompt, is_path_task, leave_out_trained, load_task, spread, task_part
from .errors import Interrupted, UserError
from .evaluate import evaluate, predictions_name, write_predictions
from .files import atomic_file, remove_stale_temps
from . import distributed
from .edge_graph import EdgeGraph
from .graph import node_device
from .memory.report import format_snapshot, memory_snapshot, out_of_memory_message
from .progress import Lines
from .spec import GraphSpec, check_name, from_dict, typed_fields
from .step import step_gradients


@dataclass
class TrainConfig:
    task: str = "arc-easy"            # training data: task[:split,...] parts joined by "+" (see load_questions)
    eval_task: str | None = None      # evaluated each epoch (default: the same tasks as `task`)
    data_dir: str | None = None       # official local files; None: the hub (bundled files for ARC-Easy)
    train_split: str = "train"
    eval_split: str = "validation"
    limit_train: int | None = None
    limit_eval: int | None = None
    epochs: int = 3
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: float = 0.05              # share of steps with linear warm-up, then cosine decay
    clip: float = 1.0                 # gradient-norm clip
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    gpu_mem: str | None = None        # device budget ("6G"): plan residency, streaming, micro-batch (needs the cache)
    prefix_cache: bool = True         # run frozen input-only work once (model-major) and train from its cache
    cache_dir: str | None = None      # where the prefix cache lives (default: <cache root>/prefix)
    checkpoint_every: int = 0         # also checkpoint every N steps (0: at the end of each epoch only)
    max_steps: int | None = None      # stop (with a checkpoint) after this many steps in all
    init: str = "random"              # random | ridge: projections start as Ridge maps into an anchor's latent
    init_anchor: str | None = None    # the node whose principal directions span the latent (default: 1st refiner)
    columns: str | None = None        # hf:ORG/NAME tasks: question=...,choices=...,answer=... (data.parse_columns)
    allow_test_training: bool = False  # train on a test split (refused otherwise: it contaminates the results)
    objective: str = "choice"         # choice: score answer options | lm: next-token prediction on text (lm.py)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "train") -> "TrainConfig":
        """Settings checked for type and range, each bad one named in one line."""
        cfg = cls(**typed_fields(cls, raw, where, "setting"))
        checks = [("epochs", cfg.epochs >= 1, ">= 1"), ("batch_size", cfg.batch_size >= 1, ">= 1"),
                  ("lr", cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
                  ("warmup", 0 <= cfg.warmup < 1, "in [0, 1)"), ("clip", cfg.clip > 0, "> 0"),
                  ("limit_train", cfg.limit_train is None or cfg.limit_train >= 1, ">= 1 (or left out: no limit)"),
                  ("limit_eval", cfg.limit_eval is None or cfg.limit_eval >= 1, ">= 1 (or left out: no limit)"),
                  ("checkpoint_every", cfg.checkpoint_every >= 0, ">= 0 (0: at each epoch's end only)"),
                  ("max_steps", cfg.max_steps is None or cfg.max_steps >= 1, ">= 1 (or left out)"),
                  ("init", cfg.init in ("random", "ridge"), "random or ridge"),
                  ("objective", cfg.objective in ("choice", "lm"), "choice or lm")]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"{where}: {name} must be {rule}, got {getattr(cfg, name)!r}")
        return cfg

    def evaluated(self) -> str:
        """The tasks evaluated: eval_task, or the training tasks without their explicit splits."""
        return self.eval_task or "+".join(task_part(part)[0] for part in self.task.split("+"))

    def check_splits(self) -> None:
        """Refuse what contaminates a reproduction (training on a test split, or on a file named like one) and a
        file task without an evaluation task (a file has no splits to evaluate on)."""
        for part in self.task.split("+"):
            task, splits, _ = task_part(part)
            is_file = is_path_task(task) and not Path(task).expanduser().is_dir()
            for split in splits or [self.train_split]:
                test = split == "test" or (is_file and re.search(r"(^|[^a-z])test([^a-z]|$)", Path(task).stem.lower()))
                if test and not self.allow_test_training:
                    where = task if is_path_task(task) else f"{task}:{split}"
                    raise UserError(f"training on a test split ({where}) would contaminate every result measured "
                                    "on it; add --allow-test-training if that is what you want")
            if is_file and self.eval_task is None:
                raise UserError(f"{task} is one file, with no splits: give the questions to evaluate on with "
                                "--eval-task FILE, or a folder with train and validation files as the task")

    def resolved_device(self) -> torch.device:
        """The device asked for; under several ranks on CUDA, each rank's own GPU (LOCAL_RANK)."""
        from .distributed import current

        if self.device == "auto":
            return current().device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise UserError(f"unknown device {self.device!r} (use auto, cpu, cuda or cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {self.device!r} asked for, but no CUDA device is available")
        return current().device(device)


def load_questions(selection: str, split: str, data_dir: str | None = None, limit: int | None = None,
                   columns: str | None = None) -> list[Question]:
    """Questions of `task[:split,split...]` parts joined by `+`; a part without splits takes `split`.

    A part may end in `@N`: N questions drawn from it with a fixed seed. The paper's training data without
    MMLU's test split is `arc-challenge:train+openbookqa:train+mmlu:auxiliary_train,dev,validation@14042`.
    `limit` keeps at most that many questions of each part, so every task is seen (and every subject: see
    data.spread). `columns` maps an hf:ORG/NAME part's columns.
    """
    questions = []
    for part in selection.split("+"):
        task, splits, sample = task_part(part)
        chosen = []
        for one in splits or [split]:
            chosen += load_task(task, one, data_dir, columns=columns if task.startswith("hf:") else None)
        if sample:
            if not sample.isdigit() or int(sample) < 1:
                raise UserError(f"{part.strip()}: expected a number of questions (>= 1) after @")
            if int(sample) < len(chosen):
                chosen = random.Random(0).sample(chosen, int(sample))
        questions += spread(chosen, limit) if limit else chosen
    return questions


def _schedule(total_steps: int, warmup: float):
    """Linear warm-up, then cosine decay to 0. Not transformers' get_cosine_schedule_with_warmup: its warm-up
    starts at lr 0, so the first step would change nothing; ours starts at lr / warm-up steps."""
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
    return factor


def save_config(run_dir: Path, spec: GraphSpec, cfg: TrainConfig) -> None:
    with atomic_file(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump({"graph": spec.to_dict(), "train": dataclasses.asdict(cfg)}, sort_keys=False))


def load_run_config(run_dir: Path) -> tuple[GraphSpec, TrainConfig]:
    from .spec import read_yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml)")
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("graph"), dict) or not isinstance(raw.get("train"), dict):
        raise UserError(f"{path}: not a run's config (expected the mappings 'graph' and 'train')")
    graph = dict(raw["graph"])
    graph.pop("train", None)
    return from_dict(graph, str(path)), TrainConfig.from_dict(raw["train"], f"{path}: train")


def create_run_dir(root: str | Path, name: str) -> Path:
    """A new, unique run folder `<root>/<name>-<time>[-n]`, made atomically (two runs started in the same second
    get two folders)."""
    check_name(name, "run name")
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the runs folder {root}: {e.strerror}") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        path = root / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot make the run folder {path}: {e.strerror}") from None
    raise UserError(f"no free run folder name under {root} for {name}-{stamp}")


def claim_run_dir(path: str | Path) -> Path:
    """An exact run folder (--run-dir): made now, or taken if it exists and is empty."""
    path = Path(path)
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if not path.is_dir() or any(path.iterdir()):
            raise UserError(f"run folder {path} exists and is not empty (use --resume {path} to continue it)") \
                from None
    except OSError as e:
        raise UserError(f"cannot make the run folder {path}: {e.strerror}") from None
    return path


class StopSignals:
    """Ctrl-C and SIGTERM (what a job scheduler sends) end a run without losing it. Inside the training loop the
    first one lets the step under way finish, then a checkpoint is written; elsewhere (the frozen pass,
    evaluation), or at a second signal, the run stops at once and keeps its last checkpoint."""

    def __init__(self):
        self.received: int | None = None
        self.in_loop = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        first = self.received is None
        self.received = signum
        if not (first and self.in_loop):
            raise KeyboardInterrupt

    @property
    def signum(self) -> int:
        return self.received or signal.SIGINT


def describe_device(device: torch.device, cfg: TrainConfig) -> str:
    """Where the run computes, said once at its start (and why, when a GPU was expected but none is there)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"device: {device} ({props.name}, {props.total_memory / 2 ** 30:.1f} GiB)"
    why = ""
    if cfg.device == "auto":
        why = " (no GPU found, running on CPU"
        why += f"; --gpu-mem {cfg.gpu_mem} is planned as on a GPU)" if cfg.gpu_mem else ")"
    return f"device: {device}{why}, {torch.get_num_threads()} threads"


class PlacedGraph:
    """The graph built for a run's settings, and its placement (memory/placement.py): everything on the device, or
    under a --gpu-mem plan, nodes in host memory with each phase moving what it needs. The same for training and
    evaluation. Two explicit calls: `frozen_states` (the frozen pass) and `start_steps` (the refiners' upper
    layers placed for training or evaluation)."""

    def __init__(self, spec: GraphSpec, cfg: TrainConfig, log=print, progress: bool = True):
        from .memory.placement import Placement

        self.cfg, self.log, self.progress = cfg, log, progress
        self.device = cfg.resolved_device()
        log(describe_device(self.device, cfg))
        self.plan = None
        self.cached = cfg.prefix_cache
        placed_nodes = [n.name for n in spec.nodes if n.device]
        if placed_nodes and distributed.current().active:
            raise UserError(f"node {placed_nodes[0]} names its device, and the run has several ranks: every rank "
                            "would put it on that same GPU. Use one or the other (nodes on devices in one process, "
                            "or data parallel over whole copies)")
        if cfg.gpu_mem:
            from .memory.placement import _exact as _exact_device
            from .memory.plan import check_device_room, format_plan, make_plan, parse_budgets

            if not cfg.prefix_cache:
                raise UserError("a --gpu-mem plan trains from the prefix cache: drop prefix_cache: false")
            planned = dataclasses.replace(spec, train={**spec.train, "objective": cfg.objective})
            self.plan = make_plan(planned, parse_budgets(cfg.gpu_mem), cfg.batch_size, spec.max_length,
                                  main=str(_exact_device(self.device)))
            log(format_plan(self.plan, spec))
            check_device_room(self.plan, str(_exact_device(self.device)))
        self.placement = Placement(self.device, self.plan)
        self.graph = distributed.main_first(lambda: EdgeGraph.build(
            spec, self.device, progress=log if progress else None, seed=cfg.seed,
            load_device=self.placement.load_device, objective=cfg.objective), distributed.current())

    @property
    def micro_batch(self) -> int:
        """Examples per forward, in training and evaluation alike: the plan's micro-batch, else the whole batch."""
        return self.plan.micro_batch if self.plan is not None else self.cfg.batch_size

    def frozen_states(self, *question_sets: list[Question]) -> list:
        """The model-major frozen pass over each set of questions (cached), each node placed as the plan says.
        What `start_steps` placed is given back first: the pass needs the room."""
        from .cache import PrefixCache
        return self.frozen_items(*([(q.id, format_prompt(q)) for q in questions] for questions in question_sets))

    def frozen_items(self, *item_sets: list[tuple[str, str]]) -> list:
        """The frozen pass over each set of (id, text) items (cached): questions as prompts, or the lm objective's
        passages. Every set's missing entries are checked against the disk before the first node runs."""
        from .cache import PrefixCache
        from .frozen_pass import check_cache_room, run_frozen_pass
        from .tiny import cache_root

        self.stop_steps()
        cache = PrefixCache(self.cfg.cache_dir or cache_root() / "prefix", log=self.log)
        batch = self.plan.frozen_micro_batch if self.plan is not None else self.cfg.batch_size
        check_cache_room(self.graph, item_sets, cache)
        return [run_frozen_pass(self.graph, items, cache, batch, self.progress, self.placement)
                for items in item_sets]

    def start_steps(self) -> None:
        """The refiners' upper layers placed for training and evaluation (resident or streamed)."""
        self.placement.start_steps(self.graph)

    def stop_steps(self) -> None:
        self.placement.stop_steps()

    @property
    def streamers(self):
        return self.placement.streamers


class Trainer:
    """One run: build once, then `fit`. Holds the state a checkpoint captures."""

    def __init__(self, spec: GraphSpec, cfg: TrainConfig, run_dir: Path, progress: bool = True, log=print):
        self.spec, self.cfg, self.run_dir, self.progress, self.log = spec, cfg, Path(run_dir), progress, log
        cfg.check_splits()
        self.train_set = load_questions(cfg.task, cfg.train_split, cfg.data_dir, cfg.limit_train, cfg.columns)
        evaluated = load_questions(cfg.evaluated(), cfg.eval_split, cfg.data_dir, cfg.limit_eval, cfg.columns)
        self.eval_set = leave_out_trained(evaluated, self.train_set)
        if not self.train_set:
            raise UserError(f"no training questions in {cfg.task} {cfg.train_split}")
        if evaluated and not self.eval_set:
            raise UserError(f"every question of {cfg.evaluated()} {cfg.eval_split} is also a training question: "
                            "evaluate on another split (--eval-split) or task (--eval-task)")
        log(f"run folder: {self.run_dir}")
        if len(self.eval_set) < len(evaluated):
            log(f"evaluation: {len(evaluated) - len(self.eval_set):,} of the {len(evaluated):,} questions to evaluate "
                "are also training questions and are left out")
        log(f"data: {len(self.train_set):,} training questions ({cfg.task}, {cfg.train_split}), "
            f"{len(self.eval_set):,} evaluated after each epoch ({cfg.evaluated()}, {cfg.eval_split}); "
            f"{math.ceil(len(self.train_set) / cfg.batch_size)} steps per epoch of {cfg.batch_size}, "
            f"{cfg.epochs} epochs")
        if cfg.prefix_cache:
            from .tiny import cache_root

            log(f"prefix cache: {cfg.cache_dir or cache_root() / 'prefix'} (lowmem-graph cache lists and clears it)")
        transformers.set_seed(cfg.seed)
        self.placed = PlacedGraph(spec, cfg, log, progress)
        self.graph, self.plan, self.device = self.placed.graph, self.placed.plan, self.placed.device
        self.other_cards = self._other_cards()
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.ranks = distributed.current()
        if self.ranks.active and cfg.batch_size % self.ranks.world:
            raise UserError(f"batch size {cfg.batch_size} does not split over {self.ranks.world} ranks: give a "
                            f"multiple of {self.ranks.world} (the global batch is split across ranks)")
        self.optimizer = torch.optim.AdamW(self.graph.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(self.total_steps, cfg.warmup))
        self.step = 0
        self.micro_batch = self.placed.micro_batch
        self.train_states = self.eval_states = None
        if self.placed.cached:
            self.train_states, self.eval_states = self.placed.frozen_states(self.train_set, self.eval_set)
        if cfg.init == "ridge":
            self._ridge_init()
        self.model = self.graph         # what a step's forward runs through: the graph, or DDP around it
        if self.ranks.active:           # PyTorch's own: parameters broadcast from rank 0, gradients averaged
            self.model = torch.nn.parallel.DistributedDataParallel(self.graph)
        self.placed.start_steps()

    # ---- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if not self.ranks.main:
            return
        runstate.save_checkpoint(self.run_dir, self.step, self.graph.trainable_state(), self.optimizer.state_dict(),
                                 self.scheduler.state_dict())

    def load_checkpoint(self) -> int:
        """Continue from the run's last checkpoint (or from step 0 if it was stopped before the first one); the
        metrics after that step are dropped, since they are replayed. Returns the step."""
        state = runstate.load_checkpoint(self.run_dir)
        if state is not None:
            try:
                self.graph.load_trainable(state.trainable, f"{self.run_dir}/checkpoint")
                self.optimizer.load_state_dict(state.optimizer)
                self.scheduler.load_state_dict(state.scheduler)
                runstate.set_rng_state(state.rng["json"], state.rng["tensors"])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise UserError(f"{self.run_dir}: the checkpoint does not fit this run ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:160]})") from None
            self.step = state.step
        if self.ranks.main:
            runstate.keep_metrics_until(self.run_dir / "metrics.jsonl", self.step)
        distributed.barrier(self.ranks)
        return self.step

    def _ridge_init(self) -> None:
        """Start the projections aligned (ridge.ridge_init), from the training questions' cached states."""
        from .ridge import pooled_states, ridge_init

        if self.spec.by_edges:
            raise UserError("init: ridge fits the maps of the paper's shape (readers into one latent); a graph given "
                            "by its edges starts from random maps (drop --init ridge)")
        if self.train_states is None:
            raise UserError("init: ridge fits its maps on the prefix cache's states: drop prefix_cache: false")
        states = pooled_states(self.graph, self.train_states, self.train_set)
        anchor = ridge_init(self.graph, states, self.cfg.init_anchor, self.cfg.seed)
        self.log(f"ridge init: the latent is spanned by {anchor}'s leading principal directions; every projection "
                 f"is a Ridge map into it ({len(self.train_set)} questions)")

    def _metric(self, record: dict) -> None:
        if not self.ranks.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _other_cards(self) -> tuple[str, ...]:
        """The cards besides the run's that nodes compute on (a node's own `device:`): their peaks are reported."""
        from .memory.placement import _exact

        main = str(_exact(self.device))
        cards = {str(_exact(node_device(n, self.device))) for n in self.spec.nodes}
        return tuple(sorted(c for c in cards if c.startswith("cuda") and c != main))

    # ---- the loop -----------------------------------------------------------------------------------------
    def step_inputs(self, questions: list[Question]) -> list:
        """A step's micro-batches, each (batch, its cached states in host memory, pinned on CUDA, or nothing when
        the nodes run here): tokenizing, reading the cache and padding, the part of a step that `fit` runs ahead
        on another thread."""
        cached = self.train_states is not None
        batches = [self.graph.collate(questions[start:start + self.micro_batch], cached=cached)
                   for start in range(0, len(questions), self.micro_batch)]
        pin = self.device.type == "cuda"
        return [(batch, self.train_states.gather(self.graph, batch, pin) if cached else None) for batch in batches]

    def train_step(self, questions: list[Question], inputs: list | None = None) -> dict:
        """One optimizer step over `questions`, in micro-batches when the plan asks for them (same gradient).
        `inputs`: what `step_inputs` made for them, ahead of time."""
        self.optimizer.zero_grad(set_to_none=True)
        mine = distributed.shard(questions, self.ranks)
        idle = not mine     # fewer questions than ranks (an epoch's last step): a step that adds zero gradient
        if idle:
            mine, inputs = questions[:1], None
        parts = ((batch, self.train_states.placed(self.graph, host) if host is not None else ())
                 for batch, host in (inputs if inputs is not None else self.step_inputs(mine)))
        # each rank's share of the mean over the global batch; DDP averages the ranks' gradients
        sums = step_gradients(self.model, parts, math.inf if idle else len(questions) / self.ranks.world,
                              self.device, self.placed.placement)
        if idle:
            sums = [torch.zeros_like(torch.as_tensor(x, dtype=torch.float64)) for x in sums]
        if self.ranks.active:
            sums = [distributed.all_sum(torch.as_tensor(x, dtype=torch.float64).reshape(-1).cpu(), self.ranks)
                    for x in sums]
            sums = [x[0] if len(x) == 1 and i < 2 else x for i, x in enumerate(sums)]
        total_loss, correct, routing = (float(x) if x.dim() == 0 else x for x in sums)
        norms = projection_grad_norms(self.graph)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.graph.parameters(), self.cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        readers = sum(v for k, v in norms.items() if k.startswith("project."))
        matrices = sum(v for k, v in norms.items() if k.startswith(("project.", "readout.", "carry.")))
        return {"loss": total_loss / len(questions), "acc": correct / len(questions), "grad_norm": float(grad_norm),
                "grad_norms": norms, "reader_grad_share": readers / matrices if matrices else 0.0,
                "routing": dict(zip(self.graph.refiners, (routing / len(questions)).tolist()))}

    def _stopping(self, stop: StopSignals) -> bool:
        """Whether a signal asked the run to stop; under several ranks, whether any rank got one (they stop at the
        same step, so none waits for the others in a collective)."""
        if not self.ranks.active:
            return stop.received is not None
        return bool(distributed.all_sum(torch.tensor([float(stop.received is not None)]), self.ranks)[0] > 0)

    def _stop(self, why: str) -> dict:
        self.save_checkpoint()
        self.log(f"{why}: stopped after step {self.step}/{self.total_steps} with a checkpoint; resume with: "
                 f"lowmem-graph train --resume {self.run_dir}")
        return {"stopped_at_step": self.step, "why": why}

    def close(self) -> None:
        self.placed.stop_steps()

    def end_training(self) -> None:
        """Free the gradients and AdamW states (12 B per trainable parameter) when only evaluation follows: a frozen
        pass after training is planned, like the first, with the trainables' weights alone on the device."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()

    def fit(self, stop: StopSignals | None = None) -> dict:
        """Train from `self.step` to the end, evaluating after each epoch. `stop` (installed by `train`) ends the
        loop between steps with a checkpoint."""
        cfg = self.cfg
        stop = stop or StopSignals()          # not entered: it never fires
        for card in ((self.device,) if self.device.type == "cuda" else ()) + self.other_cards:
            torch.cuda.reset_peak_memory_stats(card)
        result = self._unfinished_epoch_end()
        while self.step < self.total_steps:
            epoch, first = divmod(self.step, self.steps_per_epoch)
            order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(cfg.seed * 1009 + epoch))
            losses, accs, started = [], [], time.time()
            bar = tqdm(range(first, self.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=None if self.progress else True, leave=False)
            lines = Lines(self.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs} step", first, self.log) \
                if self.progress and bar.disable else None      # no terminal (a log file): a line now and then
            stop.in_loop = True

            def questions_of(i):
                return [self.train_set[k] for k in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]

            ahead = ThreadPoolExecutor(1)       # the next step's inputs are assembled while this one computes
            def inputs_of(i):       # this rank's part of step i
                return self.step_inputs(distributed.shard(questions_of(i), self.ranks))

            upcoming = ahead.submit(inputs_of, first) if first < self.steps_per_epoch else None
            try:
                for i in bar:
                    if self._stopping(stop):
                        return {**self._stop(f"interrupted ({signal.Signals(stop.signum).name})"),
                                "signal": stop.signum}
                    questions, inputs = questions_of(i), upcoming.result()
                    upcoming = ahead.submit(inputs_of, i + 1) if i + 1 < self.steps_per_epoch else None
                    metrics = self.train_step(questions, inputs)
                    self.step += 1
                    losses.append(metrics["loss"])
                    accs.append(metrics["acc"])
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                    if lines is not None:
                        lines.update(i + 1, f"loss {metrics['loss']:.3f}")
                    self._metric({"kind": "step", "step": self.step, "epoch": epoch + 1, **metrics,
                                  "lr": self.scheduler.get_last_lr()[0],
                                  **memory_snapshot(self.device, self.other_cards)})
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if cfg.max_steps is not None and self.step >= cfg.max_steps and i + 1 < self.steps_per_epoch:
                        return self._stop("max_steps")
            finally:
                stop.in_loop = False
                ahead.shutdown(wait=True, cancel_futures=True)
            bar.close()
            self.save_checkpoint()      # the epoch's steps are safe before its (long) evaluation
            if self._stopping(stop):
                return {**self._stop(f"interrupted ({signal.Signals(stop.signum).name})"), "signal": stop.signum}
            result = self._end_epoch(epoch, losses, accs, started)
            if cfg.max_steps is not None and self.step >= cfg.max_steps and self.step < self.total_steps:
                return self._stop("max_steps")     # stopped at an epoch's end: after its evaluation
        if result is None:   # resumed a finished run: nothing left to train
            result = evaluate(self.graph, self.eval_set, self.micro_batch, self.progress, "eval", self.eval_states,
                              self.ranks)
        if not self.ranks.main:
            return {"eval_acc": result.accuracy, "eval_ci": result.interval, "steps": self.step}
        write_predictions(result, self.run_dir / predictions_name(cfg.evaluated(), cfg.eval_split))
        from .plots import device_label, plot_curves, plot_memory, plot_signals

        plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        plot_memory(self.run_dir / "metrics.jsonl", self.run_dir / "memory.png", device=device_label(self.device),
                    plan=self.plan)
        plot_signals(self.run_dir / "metrics.jsonl", self.run_dir / "signals.png")
        return {"eval_acc": result.accuracy, "eval_ci": result.interval, "steps": self.step}

    def _end_epoch(self, epoch: int, losses: list[float], accs: list[float], started: float):
        """Evaluate after epoch `epoch` (0-based), log it and add its record to the metrics."""
        cfg = self.cfg
        result = evaluate(self.graph, self.eval_set, self.micro_batch, self.progress, "eval", self.eval_states,
                              self.ranks)
        memory = memory_snapshot(self.device, self.other_cards)
        record = {"kind": "epoch", "epoch": epoch + 1, "step": self.step,
                  "train_loss": float(np.mean(losses)) if losses else None,
                  "train_acc": float(np.mean(accs)) if accs else None,
                  "eval_loss": result.loss, "eval_acc": result.accuracy, "eval_ci": list(result.interval),
                  "eval_n": result.n, "routing": dict(zip(self.graph.refiners, result.routing)),
                  "seconds": time.time() - started, **memory}
        self._metric(record)
        train_text = f"train loss {record['train_loss']:.3f} acc {record['train_acc']:.3f}" if losses else ""
        self.log(f"epoch {epoch + 1}/{cfg.epochs}  {train_text} | {cfg.eval_split} {result.summary()} | "
                 f"{record['seconds']:.1f} s | {format_snapshot(memory)}")
        return result

    def _unfinished_epoch_end(self):
        """A run stopped after an epoch's last step but before its evaluation: evaluate that epoch now."""
        epoch, into = divmod(self.step, self.steps_per_epoch)
        if self.step == 0 or into:
            return None
        records = runstate.read_metrics(self.run_dir / "metrics.jsonl")
        if any(r.get("kind") == "epoch" and r.get("epoch") == epoch for r in records):
            return None
        steps = [r for r in records if r.get("kind") == "step" and r.get("epoch") == epoch]
        return self._end_epoch(epoch - 1, [r["loss"] for r in steps], [r["acc"] for r in steps], time.time())


def projection_grad_norms(graph) -> dict[str, float]:
    """Gradient norm of each projection matrix (W_k of the readers, W_j of the refiners; on a graph given by its
    edges, each edge's map and gate) and of the output node: the paper's figure of which projections learn, and how
    much of the signal crosses the frozen models."""
    norms = {}
    parts = []
    for name, child in graph.named_children():
        if isinstance(child, (torch.nn.ModuleDict, torch.nn.ParameterDict)):
            parts += [(f"{name}.{k}", [v] if isinstance(v, torch.nn.Parameter) else list(v.parameters()))
                      for k, v in child.items()]
        elif child is not None:
            parts.append((name, list(child.parameters())))
    for name, params in parts:
        grads = [p.grad.float().norm() for p in params if p.grad is not None]
        norms[name] = float(torch.stack(grads).norm()) if grads else 0.0
    return norms


def train(spec: GraphSpec, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """Train (or resume) a run in `run_dir` (a new run takes an empty folder or makes it). config.yaml is written
    first, so a run killed at any moment resumes: from its last checkpoint, or from step 0. A new run that fails
    before its first checkpoint (bad input, out of memory) leaves no folder behind; an interrupted one (Ctrl-C,
    SIGTERM) keeps it and raises `Interrupted` saying how to resume."""
    run_dir = Path(run_dir)
    ranks = distributed.current()
    if not ranks.main:      # rank 0 logs and writes the run folder; the others compute
        log, progress = (lambda *_: None), False
    if ranks.main and resume:
        for folder in (run_dir, run_dir / runstate.STORE):
            remove_stale_temps(folder)          # what killed writes left
    elif ranks.main:
        claim_run_dir(run_dir)
        save_config(run_dir, spec, cfg)
    distributed.barrier(ranks)
    trainer = None
    with StopSignals() as stop:
        try:
            trainer = Trainer(spec, cfg, run_dir, progress, log)     # the frozen pass runs here: it can OOM too
            if resume:
                log(f"resuming {run_dir} at step {trainer.load_checkpoint()}/{trainer.total_steps}")
            summary = trainer.fit(stop)
        except KeyboardInterrupt:
            at = f"at step {trainer.step}" if trainer is not None else "before training"
            kept = "its last checkpoint is kept" if runstate.has_checkpoint(run_dir) else "it restarts from step 0"
            raise Interrupted(f"interrupted ({signal.Signals(stop.signum).name}) {at}; {kept}: "
                              f"lowmem-graph train --resume {run_dir}", 128 + stop.signum) from None
        except torch.cuda.OutOfMemoryError as e:
            _discard_unstarted(run_dir, resume)
            raise UserError(out_of_memory_message(e, getattr(trainer, "plan", None))) from e
        except MemoryError:
            _discard_unstarted(run_dir, resume)
            plan = getattr(trainer, "plan", None)
            need = (f"the plan's host figure is {plan.host_peak / 2 ** 30:.2f} GiB" if plan is not None
                    else "without --gpu-mem every node loads whole")
            raise UserError(f"out of host memory ({need}); close other programs, use fewer or smaller nodes, or "
                            "a smaller --batch-size") from None
        except BaseException:
            _discard_unstarted(run_dir, resume)
            raise
        finally:
            if trainer is not None:
                trainer.close()
    if "signal" in summary:
        raise Interrupted(f"interrupted ({signal.Signals(summary['signal']).name})", 128 + summary["signal"])
    summary["trainer"] = trainer     # in-process callers (reproduce) evaluate further without reloading
    summary["run_dir"] = str(run_dir)
    summary["memory"] = memory_snapshot(trainer.device, trainer.other_cards)
    return summary


def _discard_unstarted(run_dir: Path, resume: bool) -> None:
    """A new run that failed before its first checkpoint leaves nothing behind (rank 0 clears it)."""
    if not resume and distributed.current().main and not runstate.has_checkpoint(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
