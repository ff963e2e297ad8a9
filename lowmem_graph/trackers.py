"""Experiment trackers, as the transformers Trainer's `--report-to tensorboard|wandb|mlflow|none`: every record a run
writes to metrics.jsonl (loss, accuracy, lr, memory figures) also goes to the tracker as scalars at its step, with
the run's settings (config.yaml) and its memory plan, through the tracker's own library (an optional extra).
One place feeds them: Trainer._metric, on rank 0 only."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from .errors import UserError

TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
_MODULE = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
MiB = 2 ** 20
IDS = "tracker-runs.json"       # in the run folder: {tracker: {variant or "run": the tracker's run id}}


def require(name: str):
    """The tracker's library, or one line naming the extra that installs it (checked before anything loads)."""
    if name not in TRACKERS:
        raise UserError(f"--report-to {name!r}: expected one of {', '.join(TRACKERS)}")
    if name == "none":
        return None
    import importlib

    try:
        module = importlib.import_module(_MODULE[name])
        if name == "tensorboard":
            import tensorboard  # noqa: F401  (torch's writer imports without it, then fails on first use)
        return module
    except ImportError:
        raise UserError(f"--report-to {name} needs the {name} library: pip install 'lowmem-graph[{name}]' "
                        f"(or pip install {name})") from None


def scalars(record: dict) -> dict[str, float]:
    """A metrics record's numbers as tracker tags, `[variant/]kind/key[/sub]`: every number but the step (the
    axis); nested routing shares, perplexities and intervals flattened."""
    prefix = f"{record['variant']}/" if record.get("variant") else ""
    out = {}

    def add(tag, value):
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{tag}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                add(f"{tag}/{i}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)

    for key, value in record.items():
        if key not in ("step", "variant", "kind"):
            add(f"{prefix}{record.get('kind', 'record')}/{key}", value)
    return out


def plan_figures(plan) -> dict[str, float]:
    """The memory plan's predicted figures (MiB) and its micro-batch: what the measured memory is compared with."""
    figures = {"plan/budget_mib": plan.budget / MiB, "plan/train_peak_mib": plan.peak / MiB,
               "plan/eval_peak_mib": plan.eval_peak / MiB, "plan/frozen_pass_peak_mib": plan.frozen_pass_peak / MiB,
               "plan/host_peak_mib": plan.host_peak / MiB, "plan/micro_batch": float(plan.micro_batch)}
    figures.update({f"plan/train_peak/{k}_mib": v / MiB for k, v in plan.breakdown.items()})
    return figures


def flat(settings: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as `graph.nodes.0.model`-style keys (mlflow's params are flat strings)."""
    out = {}
    for key, value in settings.items():
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
        if items is None:
            out[f"{prefix}{key}"] = str(value)
        else:
            out.update(flat(dict((str(k), v) for k, v in items), f"{prefix}{key}."))
    return out


class RunIds:
    """The tracker's run id of one run folder's variant, made on its first start and kept in RUN/tracker-runs.json,
    so that a resume continues that tracker run and another folder of the same name (another machine, a folder
    made again) never does."""

    def __init__(self, run_dir: Path, tracker: str, variant: str | None):
        self.path, self.tracker, self.key = Path(run_dir) / IDS, tracker, variant or "run"

    def _all(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            ids = json.loads(self.path.read_text())
        except ValueError:
            ids = None
        if not isinstance(ids, dict) or not all(isinstance(v, dict) for v in ids.values()):
            from .errors import UserError

            raise UserError(f"{self.path} is damaged: it keeps this run's tracker run ids (remove it to start new "
                            "tracker runs)")
        return ids

    def get(self) -> str | None:
        return self._all().get(self.tracker, {}).get(self.key)

    def put(self, run_id: str) -> None:
        from .files import atomic_file

        ids = self._all()
        ids.setdefault(self.tracker, {})[self.key] = run_id
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(ids, indent=1) + "\n")


class Reporter:
    """One tracker's run: settings and plan once at the start, then every metrics record, then `close`."""

    def start(self, settings: dict, config_text: str, plan_text: str | None, plan: dict[str, float]) -> None:
        raise NotImplementedError

    def scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log(self, record: dict) -> None:
        self.scalars(scalars(record), int(record.get("step", 0)))

    def close(self) -> None:
        raise NotImplementedError


class TensorBoard(Reporter):
    """Event files under RUN/tensorboard[/variant]; a resumed run drops the events after its checkpoint's step (as
    metrics.jsonl drops its records)."""

    def __init__(self, folder: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=step + 1 if step else None)
        self.resumed = bool(step)

    def start(self, settings, config_text, plan_text, plan):
        if self.resumed:        # the first start wrote them
            return
        self.writer.add_text("config", "    " + config_text.replace("\n", "\n    "), 0)
        if plan_text is not None:
            self.writer.add_text("memory_plan", "    " + plan_text.replace("\n", "\n    "), 0)
        self.scalars(plan, 0)

    def scalars(self, values, step):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self):
        self.writer.close()


class WandB(Reporter):
    """A wandb run named after the run folder, its files in RUN/wandb (WANDB_PROJECT, default lowmem-graph;
    WANDB_MODE=offline works without a network), its id random and kept (RunIds): a resumed run continues it."""

    def __init__(self, folder: Path, name: str, ids: RunIds):
        import wandb

        self.wandb = wandb
        self.name, self.folder, self.ids, self.run = name, folder, ids, None

    def start(self, settings, config_text, plan_text, plan):
        import secrets

        run_id = self.ids.get() or secrets.token_hex(8)
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "lowmem-graph"), name=self.name,
                                   id=run_id, resume="allow", dir=str(self.folder), config=settings)
        self.ids.put(run_id)
        if plan_text is not None:
            self.run.config.update({"memory_plan": plan_text}, allow_val_change=True)
        self.run.summary.update(plan)

    def scalars(self, values, step):
        self.run.log(values, step=step)

    def close(self):
        if self.run is not None:
            self.run.finish()


class MLflow(Reporter):
    """An mlflow run in the experiment MLFLOW_EXPERIMENT_NAME (default lowmem-graph), at MLFLOW_TRACKING_URI (a
    `file:` URI works offline); the settings as params, config.yaml and the plan as artifacts. Its id is kept
    (RunIds): a resumed run reopens it (a new one where this tracking store does not have it)."""

    def __init__(self, name: str, ids: RunIds):
        from mlflow.tracking import MlflowClient

        self.client, self.name, self.ids, self.run_id = MlflowClient(), name, ids, None

    def start(self, settings, config_text, plan_text, plan):
        from mlflow.exceptions import MlflowException

        kept = self.ids.get()
        try:
            self.run_id = kept and self.client.get_run(kept).info.run_id
        except MlflowException as e:       # only a store without that run makes a new one: an outage is an error
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.run_id = None
        if self.run_id:         # the first start logged the settings and plan (an mlflow param is set once)
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lowmem-graph")
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=self.name).info.run_id
        self.ids.put(self.run_id)
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flat(settings).items()]
        for i in range(0, len(params), 100):          # mlflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, config_text, "config.yaml")
        if plan_text is not None:
            self.client.log_text(self.run_id, plan_text, "memory-plan.txt")
        self.scalars(plan, 0)

    def scalars(self, values, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, step) for tag, value in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self):
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)


def open_reporter(trainer) -> Reporter | None:
    """The reporter a trainer's `report_to` asks for, started with its settings and plan; None for `none`."""
    from .memory.report import format_plan

    t = trainer
    name = t.cfg.report_to
    require(name)
    if name == "none":
        return None
    label = f"{t.run_dir.name}-{t.variant}" if t.variant else t.run_dir.name
    if name == "tensorboard":
        reporter = TensorBoard(t.run_dir / "tensorboard" / (t.variant or ""), t.step)
    elif name == "wandb":
        reporter = WandB(t.run_dir, label, RunIds(t.run_dir, name, t.variant))
    else:
        reporter = MLflow(label, RunIds(t.run_dir, name, t.variant))
    settings = {"graph": t.spec.to_dict(), "train": dataclasses.asdict(t.cfg)}
    config_text = (t.run_dir / "config.yaml").read_text() if (t.run_dir / "config.yaml").is_file() else ""
    plan = t.plan
    reporter.start(settings, config_text, format_plan(plan, t.spec) if plan is not None else None,
                   plan_figures(plan) if plan is not None else {})
    return reporter
