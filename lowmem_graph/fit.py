"""The training loop of a Trainer (train.py), for any objective: epochs of steps, each step's inputs made ahead on
another thread, progress, metrics, checkpoints, a clean stop between steps, and each epoch's evaluation."""
from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from . import runstate
from .evaluate import predictions_name, write_predictions
from .memory.report import format_snapshot, memory_snapshot
from .progress import Lines
from .signals import StopSignals


def fit(trainer, stop: StopSignals | None = None) -> dict:
    """Train `trainer` from its step to the end, evaluating after each epoch. A variant that trains nothing (the lm
    objective's `alone`) is evaluated once."""
    t, cfg = trainer, trainer.cfg
    stop = stop or StopSignals()          # not entered: it never fires
    t.stop, t.stop_asked = stop, False
    for card in ((t.device,) if t.device.type == "cuda" else ()) + t.other_cards:
        torch.cuda.reset_peak_memory_stats(card)
    if t.optimizer is None:
        result = t.evaluate()
        t._metric({"kind": "epoch", "epoch": 0, "step": 0, "perplexity": result})
        t.log(f"{t.variant}: perplexity {_perplexities(result)}")
        return _summary(t, result)
    result = _unfinished_epoch_end(t)
    while t.step < t.total_steps:
        epoch, first = divmod(t.step, t.steps_per_epoch)
        order = torch.randperm(len(t.train_set), generator=torch.Generator().manual_seed(cfg.seed * 1009 + epoch))
        if first == 0:          # a new epoch; a resumed one continues the figures its checkpoint kept
            t.epoch_figures = {"losses": [], "accs": []}
        losses, accs, started = t.epoch_figures["losses"], t.epoch_figures["accs"], time.time()
        name = f"{t.variant} epoch" if t.variant else "epoch"
        bar = tqdm(range(first, t.steps_per_epoch), desc=f"{name} {epoch + 1}/{cfg.epochs}",
                   disable=None if t.progress else True, leave=False)
        lines = Lines(t.steps_per_epoch, f"{name} {epoch + 1}/{cfg.epochs} step", first, t.log) \
            if t.progress and bar.disable else None      # no terminal (a log file): a line now and then
        stop.in_loop = True

        def items_of(i):
            return [t.train_set[k] for k in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]

        ahead = ThreadPoolExecutor(1)       # the next step's inputs are assembled while this one computes
        upcoming = ahead.submit(t.step_inputs, items_of(first)) if first < t.steps_per_epoch else None
        try:
            for i in bar:
                if t._stopping(stop):
                    return {**t._stop(f"interrupted ({signal.Signals(stop.signum).name})"), "signal": stop.signum}
                items, inputs = items_of(i), upcoming.result()
                upcoming = ahead.submit(t.step_inputs, items_of(i + 1)) if i + 1 < t.steps_per_epoch else None
                metrics = t.train_step(items, inputs)
                t.step += 1
                losses.append(metrics["loss"])
                if "acc" in metrics:
                    accs.append(metrics["acc"])
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                if lines is not None:
                    lines.update(i + 1, f"loss {metrics['loss']:.3f}")
                t._metric({"kind": "step", "step": t.step, "epoch": epoch + 1, **metrics,
                           "lr": t.scheduler.get_last_lr()[0], **memory_snapshot(t.device, t.other_cards)})
                if cfg.checkpoint_every and t.step % cfg.checkpoint_every == 0:
                    t.save_checkpoint()
                if cfg.max_steps is not None and t.step >= cfg.max_steps and i + 1 < t.steps_per_epoch:
                    return t._stop("max_steps")
        finally:
            stop.in_loop = False
            ahead.shutdown(wait=True, cancel_futures=True)
        bar.close()
        t.save_checkpoint()      # the epoch's steps are safe before its (long) evaluation
        if t._stopping(stop, collective=True):
            return {**t._stop(f"interrupted ({signal.Signals(stop.signum).name})"), "signal": stop.signum}
        result = _end_epoch(t, epoch, losses, accs, started)
        if cfg.max_steps is not None and cfg.max_steps <= t.step < t.total_steps:
            return t._stop("max_steps")     # stopped at an epoch's end: after its evaluation
    if result is None:   # resumed a finished run: nothing left to train
        result = t.evaluate()
    if t.variant is not None:
        return _summary(t, result)
    if not t.ranks.main:
        return {"eval_acc": result.accuracy, "eval_ci": result.interval, "steps": t.step}
    write_predictions(result, t.run_dir / predictions_name(cfg.evaluated(), cfg.eval_split))
    from .plots import device_label, plot_curves, plot_memory, plot_signals

    plot_curves(t.run_dir / "metrics.jsonl", t.run_dir / "curves.png")
    plot_memory(t.run_dir / "metrics.jsonl", t.run_dir / "memory.png", device=device_label(t.device), plan=t.plan)
    plot_signals(t.run_dir / "metrics.jsonl", t.run_dir / "signals.png")
    return {"eval_acc": result.accuracy, "eval_ci": result.interval, "steps": t.step}


def _end_epoch(t, epoch: int, losses: list[float], accs: list[float], started: float):
    """Evaluate after epoch `epoch` (0-based), log it and add its record to the metrics."""
    cfg = t.cfg
    result = t.evaluate()
    memory = memory_snapshot(t.device, t.other_cards)
    train_loss = float(np.mean(losses)) if losses else None
    if t.variant is None:
        record = {"kind": "epoch", "epoch": epoch + 1, "step": t.step, "train_loss": train_loss,
                  "train_acc": float(np.mean(accs)) if accs else None,
                  "eval_loss": result.loss, "eval_acc": result.accuracy, "eval_ci": list(result.interval),
                  "eval_n": result.n, "routing": dict(zip(t.graph.refiners, result.routing)),
                  "seconds": time.time() - started, **memory}
        train_text = f"train loss {record['train_loss']:.3f} acc {record['train_acc']:.3f}" if losses else ""
        said = result.summary()
    else:
        record = {"kind": "epoch", "epoch": epoch + 1, "step": t.step, "train_loss": train_loss,
                  "perplexity": result, "seconds": time.time() - started, **memory}
        train_text = f"train loss {train_loss:.3f}" if losses else ""
        said = f"perplexity {_perplexities(result)}"
    t._metric(record)
    name = f"{t.variant} epoch" if t.variant else "epoch"
    t.log(f"{name} {epoch + 1}/{cfg.epochs}  {train_text} | {cfg.eval_split} {said} | {record['seconds']:.1f} s | "
          f"{format_snapshot(memory)}")
    return result


def _unfinished_epoch_end(t):
    """A run stopped after an epoch's last step but before its evaluation: evaluate that epoch now."""
    epoch, into = divmod(t.step, t.steps_per_epoch)
    if t.step == 0 or into:
        return None
    records = [r for r in runstate.read_metrics(t.run_dir / "metrics.jsonl") if r.get("variant") == t.variant]
    if any(r.get("kind") == "epoch" and r.get("epoch") == epoch for r in records):
        return None
    steps = [r for r in records if r.get("kind") == "step" and r.get("epoch") == epoch]
    return _end_epoch(t, epoch - 1, [r["loss"] for r in steps], [r["acc"] for r in steps if "acc" in r], time.time())


def _perplexities(ppl: dict) -> str:
    return ", ".join(f"{j} {v:.2f}" for j, v in ppl.items())


def _summary(t, perplexity: dict) -> dict:
    """An lm variant's result: what trained, its perplexities per epoch (from the metrics), the last, the steps."""
    records = [r for r in runstate.read_metrics(t.run_dir / "metrics.jsonl")
               if r.get("variant") == t.variant and r.get("kind") == "epoch"] if t.ranks.main else []
    result = {"variant": t.variant, "trainable": sum(p.numel() for p in t.trained.parameters() if p.requires_grad),
              "epochs": [{"epoch": r["epoch"], "train_loss": r["train_loss"], "perplexity": r["perplexity"]}
                         for r in records if r["epoch"] > 0],
              "perplexity": perplexity, "steps": t.step}
    if t.variant == "coupled":
        result["gates"] = {k: float(torch.sigmoid(g.detach())) for k, g in t.graph.gate.items()}
    return result
