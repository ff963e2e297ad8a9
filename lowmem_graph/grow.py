"""A graph grown from a trained run (`--init-from RUN`): specialists added or removed without retraining the rest.

The edges this graph shares with the run (same ends, each node the same model, same layers and kind) start from
the run's trained weights; the others start fresh. An edge of the run whose node this graph removed simply goes.
Which edges train: all but those marked `train: false` in the spec, and with `--train-only new-edges` only the
edges the run did not have. Edges are matched by what they are, not by their place in the list, since a parameter's
name carries its edge's index (topology.place). The run records what it took (RECORD): resumed from a checkpoint,
it reads nothing of the other run again; resumed before its first, only that run's weights as they were.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .topology import Edge, of_spec

_PARTS = ("project", "bridge", "gate", "carry")     # the edges' parameters, each keyed by its site's name
TRAIN_ONLY = ("new-edges",)
RECORD = "init-from.json"       # in a run grown from another: the sites it shares and the SHA-256 of their weights


def _identity(e: Edge, models: dict[str, str]) -> tuple:
    return (e.source, models.get(e.source), e.target, models.get(e.target), e.read, e.pooling, e.at, e.kind, e.blend)


def run_weights(run_dir: Path) -> tuple[Path, dict]:
    """(the file, the tensors) of a finished run's trained weights, each checked against the SHA-256 recorded when
    it was written: its coupled graph's (lm) or its graph's (multiple choice)."""
    from .runstate import trainable_weights, variant_weights

    run_dir = Path(run_dir)
    if (run_dir / "weights-coupled.safetensors").is_file():
        return run_dir / "weights-coupled.safetensors", variant_weights(run_dir, "coupled")
    if (run_dir / "trainable.safetensors").exists():
        return (run_dir / "trainable.safetensors").resolve(), trainable_weights(run_dir)
    raise UserError(f"--init-from {run_dir}: no trained weights there (weights-coupled.safetensors or "
                    "trainable.safetensors; did the run finish?)")


def shared_sites(graph, old_spec) -> dict[str, str]:
    """{this graph's site name: the run's} for every edge the two share."""
    def named(spec):
        models = {n.name: n.model for n in spec.nodes}
        return {_identity(e, models): f"{i}-{e.source}-{e.target}" for i, e in enumerate(of_spec(spec).edges)}

    old = named(old_spec)
    return {key: old[identity] for identity, key in named(graph.spec).items() if identity in old}


def start_from(graph, init_from: str | Path | None, train_only: str | None = None, run_dir: Path | None = None,
               load: bool = True, write: bool = True) -> tuple[list[str], list[str]]:
    """Freeze what must not train and, with `load`, load `init_from`'s weights into the edges `graph` shares with
    it. Returns (the shared sites, the frozen sites). `run_dir`: the new run's folder, where the sites shared and
    the SHA-256 of the weights taken are recorded (RECORD, by the process that `write`s) when it starts: its resume
    then reads nothing of `init_from` when a checkpoint holds its weights (`load` False), and before its first
    checkpoint takes `init_from`'s weights only if they are still those it started from."""
    from .files import atomic_file, file_sha256
    from .settings import load_run_config

    frozen = {f"{i}-{e.source}-{e.target}" for i, e in enumerate(of_spec(graph.spec).edges) if not e.train}
    shared = {}
    if init_from:
        record = Path(run_dir) / RECORD if run_dir is not None else None
        kept = _read_record(record) if record is not None and record.is_file() else None
        if kept is None:
            old_spec, _ = load_run_config(Path(init_from))
            shared = shared_sites(graph, old_spec)
        else:
            shared = kept["shared"]
        if load or kept is None:
            path, state = run_weights(Path(init_from))
            digest = file_sha256(path)
            if kept is not None and digest != kept["sha256"]:
                raise UserError(f"--init-from {init_from}: its weights changed since this run started from them, so "
                                "its resume would not be the run it began; restore them, or start the run again")
            if kept is None and record is not None and write:
                with atomic_file(record) as tmp:
                    tmp.write_text(json.dumps({"init_from": str(init_from), "sha256": digest, "shared": shared}))
            if load:
                _load_shared(graph, path, state, shared)
        if train_only == "new-edges":
            frozen |= set(shared)
    for part in _PARTS:
        for key, module in getattr(graph, part).items():
            if key in frozen:
                module.requires_grad_(False)
    return sorted(shared), sorted(frozen)


def _read_record(path: Path) -> dict:
    try:
        kept = json.loads(path.read_text())
        if isinstance(kept["sha256"], str) and all(isinstance(v, str) for v in {**kept["shared"]}.values()):
            return kept
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise UserError(f"{path} is damaged (not the record of what this run took from --init-from): start the run again")


def _load_shared(graph, path: Path, state: dict, shared: dict[str, str]) -> None:
    """The run's weights of each shared edge, renamed to this graph's sites, loaded into it."""
    own = graph.state_dict()
    renamed = {}
    for part in _PARTS:
        for new, old in shared.items():
            for key, value in state.items():
                if key == f"{part}.{old}" or key.startswith(f"{part}.{old}."):
                    mine = f"{part}.{new}" + key[len(f"{part}.{old}"):]
                    if mine in own and own[mine].shape != value.shape:
                        raise UserError(f"{path}: {key} has shape {tuple(value.shape)}, the edge here needs "
                                        f"{tuple(own[mine].shape)} (a latent of another width?)")
                    renamed[mine] = value
    graph.load_state_dict(renamed, strict=False)
