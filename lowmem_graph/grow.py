"""A graph grown from a trained run (`--init-from RUN`): specialists added or removed without retraining the rest.

The edges this graph shares with the run (same ends, each node the same model, same layers and kind) start from
the run's trained weights; the others start fresh. An edge of the run whose node this graph removed simply goes.
Which edges train: all but those marked `train: false` in the spec, and with `--train-only new-edges` only the
edges the run did not have. Edges are matched by what they are, not by their place in the list, since a parameter's
name carries its edge's index (topology.place).
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .topology import Edge, of_spec

_PARTS = ("project", "bridge", "gate", "carry")     # the edges' parameters, each keyed by its site's name
TRAIN_ONLY = ("new-edges",)


def _identity(e: Edge, models: dict[str, str]) -> tuple:
    return (e.source, models.get(e.source), e.target, models.get(e.target), e.read, e.pooling, e.at, e.kind, e.blend)


def run_weights(run_dir: Path) -> Path:
    """The trained weights of a finished run: its coupled graph's (lm) or its graph's (multiple choice)."""
    for name in ("weights-coupled.safetensors", "trainable.safetensors"):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    raise UserError(f"--init-from {run_dir}: no trained weights there (weights-coupled.safetensors or "
                    "trainable.safetensors; did the run finish?)")


def shared_sites(graph, old_spec) -> dict[str, str]:
    """{this graph's site name: the run's} for every edge the two share."""
    def named(spec):
        models = {n.name: n.model for n in spec.nodes}
        return {_identity(e, models): f"{i}-{e.source}-{e.target}" for i, e in enumerate(of_spec(spec).edges)}

    old = named(old_spec)
    return {key: old[identity] for identity, key in named(graph.spec).items() if identity in old}


def start_from(graph, run_dir: str | Path, train_only: str | None = None) -> tuple[list[str], list[str]]:
    """Load the run's weights into the edges `graph` shares with it, then freeze what must not train. Returns
    (the shared sites, the frozen sites)."""
    from safetensors.torch import load_file

    from .settings import load_run_config

    frozen = {f"{i}-{e.source}-{e.target}" for i, e in enumerate(of_spec(graph.spec).edges) if not e.train}
    shared = {}
    if run_dir:
        old_spec, _ = load_run_config(Path(run_dir))
        path = run_weights(Path(run_dir))
        state, shared = load_file(str(path)), shared_sites(graph, old_spec)
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
        if train_only == "new-edges":
            frozen |= set(shared)
    for part in _PARTS:
        for key, module in getattr(graph, part).items():
            if key in frozen:
                module.requires_grad_(False)
    return sorted(shared), sorted(frozen)
