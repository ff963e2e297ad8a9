"""A run folder's state on disk: checkpoints without pickles, the metrics log, and what a kill leaves behind.

    runs/<name>/
      config.yaml                 written when the folder is made, before any model loads
      metrics.jsonl               one JSON line per step and per epoch
      checkpoint -> .checkpoints/step-000040     a symbolic link, swapped atomically
      trainable.safetensors -> checkpoint/trainable.safetensors
      .checkpoints/step-000040/   trainable.safetensors, state.safetensors (optimizer and RNG tensors),
                                  state.json (step, scheduler, optimizer settings, RNG, file hashes)

Nothing here unpickles: tensors are safetensors, the rest JSON, so a crafted run folder cannot run code. A new
checkpoint is written whole into its own folder (flushed and fsynced), then the `checkpoint` link is replaced in
one rename: a kill at any moment leaves the previous checkpoint or the new one, and `trainable.safetensors`
(a link through `checkpoint`) always holds the weights of that same checkpoint. Folders of older versions, with a
pickled `checkpoint.pt`, are read with `torch.load(weights_only=True)` (NumPy's RNG arrays allowed), or refused in
one line.

A run folder cannot lie: every read of its weights (resume, eval, predict, export) checks them against the SHA-256
that state.json recorded when they were written, and state.json against its own digest; no link in the folder may
lead outside it (a crafted `.checkpoints` or `metrics.jsonl` would let a resume delete or write elsewhere). A lost
`checkpoint` link is not a lost run: the newest whole checkpoint in .checkpoints is taken, and said.
"""
from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import UserError
from .files import atomic_dir, check_links, file_sha256, fsync, save_file

FORMAT = 2
LINK, TRAINABLE = "checkpoint", "trainable.safetensors"
STORE = ".checkpoints"
LEGACY = "checkpoint.pt"


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict
    variant: str | None = None      # the lm objective's variant whose state this is (None: the one graph)
    epoch: dict | None = None       # the unfinished epoch's per-step figures its summary averages (fit.py)


# ---- RNG state as JSON + tensors -------------------------------------------------------------------------------
def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state, tensors


def set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=_index)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _index(key: str) -> int:
    return int(key.rsplit(".", 1)[1])


# ---- optimizer state: tensors to safetensors, the rest to JSON --------------------------------------------------
def _split_optimizer(state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        plain[str(index)] = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[str(index)][name] = value
    return {"param_groups": state["param_groups"], "state": plain}, tensors


def _join_optimizer(plain: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {int(index): dict(values) for index, values in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


# ---- writing ---------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: dict,
                    scheduler: dict, variant: str | None = None, epoch: dict | None = None) -> Path:
    """Write the checkpoint for `step` into a folder of its own, then point `checkpoint` at it in one rename.
    `epoch`: JSON values the training loop needs back to finish its epoch's figures as if never stopped."""
    run_dir = Path(run_dir)
    check_links(run_dir)                    # nothing below is written or deleted through a link leading out
    store = run_dir / STORE
    name = f"step-{step:07d}"
    plain_optimizer, tensors = _split_optimizer(optimizer)
    rng, rng_tensors = rng_state()
    target = store / name
    if target.exists():                     # the same step saved again (an epoch end after --checkpoint-every)
        shutil.rmtree(target)
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / TRAINABLE),
                  metadata={"step": str(step), "format": str(FORMAT)})
        save_file({**tensors, **rng_tensors}, str(tmp / "state.safetensors"))
        state = {"format": FORMAT, "step": step, "optimizer": plain_optimizer, "scheduler": scheduler, "rng": rng,
                 "sha256": {f: file_sha256(tmp / f) for f in (TRAINABLE, "state.safetensors")}}
        if variant is not None:
            state["variant"] = variant
        if epoch is not None:
            state["epoch"] = epoch
        (tmp / "state.json").write_text(json.dumps({**state, "digest": _digest(state)}))
    _point(run_dir / LINK, f"{STORE}/{name}")
    if not (run_dir / TRAINABLE).is_symlink():
        (run_dir / TRAINABLE).unlink(missing_ok=True)       # a file from an older version: the link replaces it
        _point(run_dir / TRAINABLE, f"{LINK}/{TRAINABLE}")
    for old in store.iterdir():                         # earlier checkpoints and leftovers of killed writes
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return target


def _digest(state: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _point(link: Path, target: str) -> None:
    """Make `link` a symbolic link to `target` in one rename (a kill leaves the old link or the new one)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync(link.parent)


# ---- reading ---------------------------------------------------------------------------------------------------
def has_checkpoint(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return ((run_dir / LINK / "state.json").is_file() or (run_dir / LEGACY).is_file()
            or any((run_dir / STORE).glob("step-*/state.json")))


def _current(run_dir: Path) -> Path | None:
    """The folder of the run's last checkpoint: where `checkpoint` points or, that link lost (or leading nowhere),
    the newest whole checkpoint in .checkpoints, said on stderr; None before the first checkpoint."""
    link = run_dir / LINK
    if link.exists():
        return link
    steps = sorted((run_dir / STORE).glob("step-*"), reverse=True) if (run_dir / STORE).is_dir() else []
    for folder in steps:
        try:
            _verified_state(folder, str(folder))
        except UserError:
            continue
        print(f"lowmem-graph: {run_dir} has {'a broken' if link.is_symlink() else 'no'} {LINK} link: using "
              f"{STORE}/{folder.name}, its newest whole checkpoint", file=sys.stderr)
        return folder
    if link.is_symlink() or steps:
        raise UserError(f"{run_dir}: the {LINK} link leads nowhere and no whole checkpoint is left in {STORE}: "
                        "resume from another copy of the run, or start it again")
    return None


def _verified_state(folder: Path, where: str) -> dict:
    """A checkpoint's state.json, checked: its digest, its format, its step, and every file's SHA-256."""
    try:
        state = json.loads((folder / "state.json").read_text())
        if not isinstance(state, dict) or state.pop("digest", None) != _digest(state):
            raise UserError(f"{where}/state.json is damaged (its digest does not match its content): resume from "
                            "another copy of the run, or start it again")
        if state.get("format") != FORMAT:
            raise UserError(f"{where}: checkpoint format {state.get('format')!r}, this version reads {FORMAT}")
        step = state.get("step")
        if type(step) is not int or step < 0:
            raise UserError(f"{where}/state.json: step {step!r} is not a count of steps (an integer >= 0)")
        for f, digest in state["sha256"].items():
            if f not in (TRAINABLE, "state.safetensors") or file_sha256(folder / f) != digest:
                raise UserError(f"{where}/{f} is damaged (its SHA-256 does not match the one recorded): resume "
                                "from another copy of the run, or start it again")
        if set(state["sha256"]) != {TRAINABLE, "state.safetensors"}:
            raise UserError(f"{where}/state.json records no SHA-256 for some of its files: not a whole checkpoint")
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{where}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
            from None
    return state


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run's last checkpoint, verified (None if it has none yet); a damaged one is one line, never a
    traceback, and never unpickled."""
    run_dir = Path(run_dir)
    check_links(run_dir)
    folder = _current(run_dir)
    if folder is None:
        return _load_legacy(run_dir / LEGACY) if (run_dir / LEGACY).is_file() else None
    where = f"{run_dir}/{folder.relative_to(run_dir)}"
    state = _verified_state(folder, where)
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        return Checkpoint(state["step"], load_file(str(folder / TRAINABLE)),
                          _join_optimizer(state["optimizer"], tensors), state["scheduler"],
                          {"json": state["rng"], "tensors": {k: v for k, v in tensors.items() if k.startswith("rng.")}},
                          state.get("variant"), state.get("epoch"))
    except (OSError, SafetensorError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{where}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
            from None


def check_optimizer_state(optimizer: dict, params: list, where: str) -> None:
    """A checkpoint's optimizer state must fit the parameters it will update: each tensor of a parameter's state
    (AdamW's moments) of that parameter's shape, no state for a parameter that is not there."""
    for index, values in optimizer["state"].items():
        if not 0 <= index < len(params):
            raise UserError(f"{where}: the optimizer state names parameter {index}, this run has {len(params)}")
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                raise UserError(f"{where}: the optimizer's {name} of parameter {index} has shape "
                                f"{tuple(value.shape)}, the parameter {tuple(params[index].shape)}")


def _load_legacy(path: Path) -> Checkpoint:
    """A pickled checkpoint of an older version, loaded the only safe way: weights_only=True."""
    safe = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):   # NumPy 2 and NumPy 1 pickles
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                safe.append(importlib.import_module(module)._reconstruct)
            except (ImportError, AttributeError):
                pass
    try:
        with torch.serialization.safe_globals(safe):
            state = torch.load(path, map_location="cpu", weights_only=True)
        python, numpy_state = state["rng"]["python"], state["rng"]["numpy"]
        rng = {"json": {"python": [python[0], list(python[1]), python[2]],
                        "numpy": [numpy_state[0], np.asarray(numpy_state[1]).tolist(), *numpy_state[2:]]},
               "tensors": {"rng.torch": state["rng"]["torch"],
                           **{f"rng.cuda.{i}": s for i, s in enumerate(state["rng"].get("cuda", []))}}}
        return Checkpoint(state["step"], state["trainable"], state["optimizer"], state["scheduler"], rng)
    except Exception as e:      # an unpickler refusal, a damaged file, a different layout: the same answer
        raise UserError(f"{path}: a checkpoint of an older version (a pickle) that does not load safely "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); start the run again") from None


def trainable_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's trained weights (`trainable.safetensors`, checked against the SHA-256 its checkpoint recorded), or
    one line saying why they cannot be read."""
    run_dir = Path(run_dir)
    check_links(run_dir)
    path = run_dir / TRAINABLE
    folder = _current(run_dir)
    if folder is not None:                  # the checkpoint's own weights, checked as written
        _verified_state(folder, f"{run_dir}/{folder.relative_to(run_dir)}")
        path = folder / TRAINABLE
    elif not path.exists():
        if (run_dir / LEGACY).is_file():
            return load_checkpoint(run_dir).trainable
        raise UserError(f"{run_dir} has no {TRAINABLE} yet (has a step finished?)")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def variant_weights(run_dir: Path, variant: str) -> dict:
    """An lm run's weights of a finished variant (weights-<variant>.safetensors, lm.train_lm's), checked against the
    SHA-256 that lm-results.json recorded when they were written, or one line saying why they cannot be read."""
    run_dir = Path(run_dir)
    check_links(run_dir)
    path = run_dir / f"weights-{variant}.safetensors"
    if not path.is_file():
        raise UserError(f"{run_dir} has no {path.name} (did its {variant} variant finish?)")
    try:
        digest = json.loads((run_dir / "lm-results.json").read_text())[variant]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        digest = None
    if not isinstance(digest, str):
        raise UserError(f"{path}: lm-results.json records no SHA-256 for it (a run of an older version, or its "
                        "record lost): its weights cannot be checked; train the run again")
    if file_sha256(path) != digest:
        raise UserError(f"{path} is damaged (its SHA-256 does not match the one lm-results.json recorded): train "
                        "the run again, or take another copy of it")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


# ---- the metrics log ---------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    """Every complete record of a metrics log: a partial last line (a kill mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def checked_records(path: str | Path) -> list[dict]:
    """A metrics log's records (read_metrics), each checked before anything plots or sums it: a record whose
    figures are not numbers (an edited or foreign file) is one line naming it, not a traceback mid-plot."""
    records = read_metrics(path)
    for n, record in enumerate(records, 1):
        for key, value in record.items():
            if key in ("kind", "variant"):
                rule, ok = "text", isinstance(value, str)
            elif key in ("step", "epoch"):
                rule, ok = "a whole number", isinstance(value, int) and not isinstance(value, bool)
            else:
                rule, ok = "a number (or numbers)", _numbers(value)
            if not ok:
                raise UserError(f"{path}: record {n}: {key} must be {rule}, got {value!r}"[:240])
        if "step" not in record or (record.get("kind") == "step" and record.get("loss") is None):
            raise UserError(f"{path}: record {n}: no step or no loss (not a metrics log of lowmem-graph?)")
    return records


def _numbers(value) -> bool:
    if isinstance(value, (dict, list)):
        return all(map(_numbers, value.values() if isinstance(value, dict) else value))
    return value is None or isinstance(value, (int, float))


def keep_metrics_until(path: Path, step: int, variant: str | None = None) -> int:
    """Drop the records after `step` (a resumed run replays them) and any partial line; returns how many went. With
    `variant` (the lm objective's --compare), only that variant's records: the others' steps are theirs."""
    from .files import atomic_file

    path = Path(path)
    if not path.is_file():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step or r.get("variant") != variant]
    dropped = len(path.read_text(errors="replace").splitlines()) - len(kept)
    if dropped:
        with atomic_file(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return dropped
