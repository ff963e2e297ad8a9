"""A run's settings and its folder: TrainConfig (every training setting, typed and checked), the questions a
selection names, and the run folder's making (unique, atomic) and its config.yaml, written first."""
from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .data import is_path_task, load_task, spread, task_part

from .questions import Question
from .errors import Interrupted, UserError
from .files import atomic_file, check_links
from .spec import GraphSpec, check_name, from_dict, typed_fields
from .trackers import TRACKERS


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
    host_mem: str | None = None       # host budget under a plan (default: what is available); the rest goes to disk
    prefix_cache: bool = True         # run frozen input-only work once (model-major) and train from its cache
    cache_dir: str | None = None      # where the prefix cache lives (default: <cache root>/prefix)
    checkpoint_every: int = 0         # also checkpoint every N steps (0: at the end of each epoch only)
    max_steps: int | None = None      # stop (with a checkpoint) after this many steps in all
    init: str = "random"              # random | ridge: projections start as Ridge maps into an anchor's latent
    init_anchor: str | None = None    # the node whose principal directions span the latent (default: 1st refiner)
    init_from: str | None = None      # a finished run: the edges shared with it start from its trained weights
    train_only: str | None = None     # new-edges: only the edges the init_from run lacks train (grow.py)
    columns: str | None = None        # hf:ORG/NAME tasks: question=...,choices=...,answer=... (data.parse_columns)
    allow_test_training: bool = False  # train on a test split (refused otherwise: it contaminates the results)
    objective: str = "choice"         # choice: score answer options | lm: next-token prediction on text (lm.py)
    compare: bool = False             # lm: also each model alone and a learned router, under the same protocol
    report_to: str = "none"           # none | tensorboard | wandb | mlflow: metrics also to a tracker (trackers.py)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "train", whole: bool = True) -> "TrainConfig":
        """Settings checked for type and range, each bad one named in one line; `whole`: also how they go together
        (not for a spec's defaults alone, which flags complete)."""
        cfg = cls(**typed_fields(cls, raw, where, "setting"))
        checks = [("epochs", cfg.epochs >= 1, ">= 1"), ("batch_size", cfg.batch_size >= 1, ">= 1"),
                  ("lr", cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
                  ("warmup", 0 <= cfg.warmup < 1, "in [0, 1)"), ("clip", cfg.clip > 0, "> 0"),
                  ("limit_train", cfg.limit_train is None or cfg.limit_train >= 1, ">= 1 (or left out: no limit)"),
                  ("limit_eval", cfg.limit_eval is None or cfg.limit_eval >= 1, ">= 1 (or left out: no limit)"),
                  ("checkpoint_every", cfg.checkpoint_every >= 0, ">= 0 (0: at each epoch's end only)"),
                  ("max_steps", cfg.max_steps is None or cfg.max_steps >= 1, ">= 1 (or left out)"),
                  ("init", cfg.init in ("random", "ridge"), "random or ridge"),
                  ("train_only", cfg.train_only in (None, "new-edges"), "new-edges (or left out: every edge)"),
                  ("train_only", cfg.train_only is None or cfg.init_from, "left out without init_from (--init-from "
                                                                          "RUN: new edges are those RUN lacks)"),
                  ("seed", 0 <= cfg.seed < 2 ** 32, "in [0, 2**32) (NumPy's seed range)"),
                  ("objective", cfg.objective in ("choice", "lm"), "choice or lm"),
                  ("report_to", cfg.report_to in TRACKERS, " or ".join(TRACKERS))]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"{where}: {name} must be {rule}, got {getattr(cfg, name)!r}")
        hub = [p for p in f"{cfg.task}+{cfg.eval_task or ''}".split("+") if p.strip().startswith("hf:")]
        if whole and cfg.columns is not None and not hub:
            raise UserError(f"{where}: columns {cfg.columns!r} map a hub data set's columns, and no task is one "
                            "(hf:ORG/NAME): drop --columns, or give the task as hf:ORG/NAME")
        return cfg

    def check_graph(self, spec: GraphSpec) -> None:
        """Settings that do not fit the graph or each other, refused before anything loads."""
        if self.compare and self.objective != "lm":
            raise UserError("--compare runs the lm objective's baselines: add --objective lm")
        if self.init == "ridge" and spec.by_edges:
            raise UserError("init: ridge fits the maps of the paper's shape (readers into one latent); a graph given "
                            "by its edges starts from random maps (drop --init ridge)")

    def evaluated(self) -> str:
        """The tasks evaluated: eval_task, or the training tasks without their explicit splits."""
        return self.eval_task or "+".join(task_part(part)[0] for part in self.task.split("+"))

    def check_splits(self) -> None:
        """Refuse what contaminates a reproduction (training on a test split, or on a file named like one) and a
        file task without an evaluation task (a file has no splits to evaluate on), or named with a split (it
        would be ignored)."""
        for part in f"{self.task}+{self.eval_task or ''}".split("+"):
            task, splits, _ = task_part(part)
            if splits and is_path_task(task) and not Path(task).expanduser().is_dir():
                raise UserError(f"{part.strip()}: {task} is one file, with no splits, so ':{','.join(splits)}' "
                                "would be ignored; drop it (a folder of split files takes a split)")
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


def spec_document(spec: GraphSpec, cfg: TrainConfig | None = None) -> dict:
    """The graph as a user writes it (nodes, latents, edges, output: the README's form, no roles), with `train:`
    holding every training setting of `cfg` (else the spec's own): the one file `--config` takes back."""
    from .spec import NodeSpec
    from .topology import edges_of

    defaults = {f.name: f.default for f in dataclasses.fields(NodeSpec)}
    roles = ("role", "read_layer", "pooling", "inject_depth", "blend")
    nodes = [{k: v for k, v in dataclasses.asdict(n).items() if k in ("name", "model") or
              (k not in roles and v != defaults[k])} for n in spec.nodes]
    if spec.edges:
        latents, edges, reads = spec.latents, spec.edges, spec.output.reads
    else:       # the paper's shape: readers -> one latent -> refiners
        topology = edges_of(spec)
        latents = [{"name": name, "dim": dim} for name, dim in topology.latents.items()]
        edges = [{"from": e.source, "read": e.read, "pooling": e.pooling, "to": e.target} if e.read is not None
                 else {"from": e.source, "to": e.target, "at": e.at, "blend": e.blend} for e in topology.edges]
        reads = topology.reads
    output = {"reads": list(reads), "heads": spec.output.heads, "max_choices": spec.output.max_choices}
    return {"name": spec.name, "quant": spec.quant, "max_length": spec.max_length, "carry": spec.carry,
            "latent_dim": spec.latent_dim, **({"injection": spec.injection} if spec.injection != "pooled" else {}),
            "nodes": nodes, "latents": [dict(x) for x in latents], "edges": [dict(e) for e in edges],
            "output": output, "train": dataclasses.asdict(cfg) if cfg is not None else dict(spec.train)}


def save_config(run_dir: Path, spec: GraphSpec, cfg: TrainConfig) -> None:
    with atomic_file(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(spec_document(spec, cfg), sort_keys=False))


def _read_config(path: Path) -> dict | None:
    """The mapping of a config file, the older run form (the mappings `graph:` and `train:`) made the spec's form;
    None when it is no mapping with a `train:` mapping (or none)."""
    from .spec import read_yaml

    raw = read_yaml(path)
    if isinstance(raw, dict) and isinstance(raw.get("graph"), dict) and isinstance(raw.get("train"), dict):
        raw = {**raw["graph"], "train": raw["train"]}
    return raw if isinstance(raw, dict) and isinstance(raw.get("train", {}), dict) else None


def load_config(path: str | Path) -> GraphSpec:
    """A graph with its training settings (`train:`) from one YAML file: a spec, or a run's config.yaml."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"graph file not found: {path}")
    raw = _read_config(path)
    if raw is None:
        raise UserError(f"{path}: expected a YAML mapping with a 'nodes' list (and 'train' a mapping)")
    return from_dict(raw, str(path))


def load_run_config(run_dir: Path) -> tuple[GraphSpec, TrainConfig]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml)")
    check_links(run_dir)        # nothing read from a run folder comes from outside it
    raw = _read_config(path)
    if raw is None or not isinstance(raw.get("train"), dict) or not isinstance(raw.get("nodes"), list):
        raise UserError(f"{path}: not a run's config (expected a graph with its 'train' settings)")
    spec = from_dict(raw, str(path))
    return spec, TrainConfig.from_dict(spec.train, f"{path}: train")


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


_BEFORE_FIRST_CHECKPOINT = {"config.yaml", "metrics.jsonl", ".checkpoints", "init-from.json",   # grow.RECORD
                            "tensorboard", "wandb", "tracker-runs.json"}   # + the trackers' folders, run ids


def discard_unstarted(run_dir: Path, error: BaseException, resumable: bool = True) -> BaseException:
    """A new run folder whose run failed before it had anything to resume (no checkpoint; nothing in it but what a
    run writes before its first) is removed by rank 0; one of a command with nothing to resume (not `resumable`:
    align, probe) whatever it holds. Returns the error to raise: a mistake's message then says the folder went
    (the run named it when it began)."""
    from .distributed import current
    from .runstate import has_checkpoint

    run_dir = Path(run_dir)
    try:
        unstarted = current().main and run_dir.is_dir() and (not resumable or (
            not has_checkpoint(run_dir) and {p.name for p in run_dir.iterdir()} <= _BEFORE_FIRST_CHECKPOINT))
    except OSError:
        return error
    if not unstarted:
        return error
    shutil.rmtree(run_dir, ignore_errors=True)
    if isinstance(error, OSError):              # a full disk: the CLI's one line, the folder gone unsaid
        return error
    why = "nothing had run" if resumable else "nothing in it can be resumed"
    if not isinstance(error, UserError):        # an interrupt or a fault: its own message, and this line
        print(f"lowmem-graph: run folder {run_dir} removed: {why}", file=sys.stderr)
        return error
    plain = getattr(error, "plain", str(error))       # a folder inside this one said so already: name this one
    said = UserError(f"{plain} (its run folder {run_dir} is removed: {why})")
    said.plain = plain
    return said


@contextlib.contextmanager
def kept_if_started(run_dir: Path, resumable: bool = True):
    """Around a command's work in its new folder, the one way a failed one goes: a failure before anything to keep
    leaves no folder, and says so (discard_unstarted). An interrupt keeps a `resumable` run's folder (--resume
    continues it); a command with nothing to resume loses its folder to any failure, an interrupt too."""
    try:
        yield
    except BaseException as e:
        if resumable and (isinstance(e, Interrupted) or not isinstance(e, Exception)):
            raise
        said = discard_unstarted(run_dir, e, resumable)
        if said is e:
            raise
        raise said from None


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

