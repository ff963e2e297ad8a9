"""Closed-form Ridge maps between the nodes' spaces ("Thinking in Different Spaces", the paper's predecessor).

How well do two frozen models' representations line up before any training? Fit a linear map from one node's
pooled states (at the layer the graph reads or injects at) to another's, with the regularisation chosen on
held-out folds, and report R^2 on questions the fit never saw, beside a permutation control (the same fit on
shuffled pairs: what chance gives) and, optionally, on a second task (does the map carry across domains?).

`ridge_init` uses the same maps to start a graph aligned: the latent is spanned by the leading principal
directions of an anchor node's states, each reader's projection is its Ridge map into that latent, and each
refiner's readout (and so its tied carry) maps its states onto the same coordinates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALPHAS = tuple(10.0 ** e for e in range(-4, 3))     # lambda = alpha x mean eigenvalue of X^T X: scale-free
FOLDS, TEST_SHARE = 5, 0.2


def pooled_states(graph, states, questions) -> dict[str, torch.Tensor]:
    """Per node, one fp64 row per question, from its first input-only part in the prefix cache: a pooled read as
    the graph uses it; per-token reads and the stream entering a node's lowest written layer averaged over its
    tokens."""
    rows = [states.rows[q.id] for q in questions]
    out = {}
    for key, entry in states.entries.items():
        kind, name, _ = key.split(":")
        if name not in out:
            out[name] = torch.stack([entry.row(r).double().reshape(-1) if kind in ("mean", "last")
                                     else entry.row(r).double().mean(0) for r in rows])
    return out


def _solve(x: torch.Tensor, y: torch.Tensor, lambdas: list[float]) -> list[torch.Tensor]:
    """Ridge weights (d_x, d_y) for every lambda at once, from one SVD of x (rows centred by the caller)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    uty = u.T @ y
    return [vh.T @ ((s / (s * s + lam))[:, None] * uty) for lam in lambdas]


def r2(y: torch.Tensor, pred: torch.Tensor, mean: torch.Tensor) -> float:
    """1 - residual / total sum of squares, over every output dimension (variance-weighted)."""
    return float(1 - ((y - pred) ** 2).sum() / ((y - mean) ** 2).sum().clamp_min(1e-30))


@dataclass
class RidgeMap:
    weight: torch.Tensor        # (d_x, d_y)
    x_mean: torch.Tensor
    y_mean: torch.Tensor
    lam: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) @ self.weight + self.y_mean


def _lambdas(x: torch.Tensor) -> list[float]:
    scale = float((x * x).sum()) / max(1, min(x.shape))
    return [a * scale for a in ALPHAS]


def fit(x: torch.Tensor, y: torch.Tensor, folds: int = FOLDS, seed: int = 0) -> RidgeMap:
    """The Ridge map x -> y, lambda chosen by k-fold cross-validated R^2 on these rows."""
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    xc, yc = x - x.mean(0), y - y.mean(0)
    lambdas = _lambdas(xc)
    scores = torch.zeros(len(lambdas))
    for k in range(folds):
        held = order[k * n // folds:(k + 1) * n // folds]
        keep = torch.cat([order[:k * n // folds], order[(k + 1) * n // folds:]])
        xm, ym = x[keep].mean(0), y[keep].mean(0)
        for i, w in enumerate(_solve(x[keep] - xm, y[keep] - ym, lambdas)):
            scores[i] += r2(y[held], (x[held] - xm) @ w + ym, y[held].mean(0))
    best = int(scores.argmax())
    (weight,) = _solve(xc, yc, [lambdas[best]])
    return RidgeMap(weight, x.mean(0), y.mean(0), lambdas[best])


def split(n: int, seed: int = 0, test_share: float = TEST_SHARE) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, math.ceil(n * test_share))
    return order[cut:], order[:cut]


def align_pair(x: torch.Tensor, y: torch.Tensor, seed: int = 0, other: tuple | None = None) -> dict:
    """Held-out R^2 of the map x -> y (fit and lambda on 80% of the rows, scored on the other 20%); the same with
    the training pairs shuffled (the permutation control); and, given `other` = (x2, y2) of a second task, the
    map's R^2 there."""
    train, test = split(x.shape[0], seed)
    mapping = fit(x[train], y[train], seed=seed)
    shuffled = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))]
    control = fit(x[train], y[shuffled], seed=seed)
    row = {"r2": r2(y[test], mapping(x[test]), y[test].mean(0)),
           "r2_permuted": r2(y[test], control(x[test]), y[test].mean(0)),
           "lambda": mapping.lam, "n_train": len(train), "n_test": len(test)}
    if other is not None:
        x2, y2 = other
        row["r2_other_task"] = r2(y2, mapping(x2), y2.mean(0))
    return row


def align_graph(states: dict[str, torch.Tensor], other: dict[str, torch.Tensor] | None = None,
                seed: int = 0, progress: bool = True) -> list[dict]:
    """Every ordered pair of nodes: one row of `align_pair`."""
    from tqdm.auto import tqdm

    pairs = [(a, b) for a in states for b in states if a != b]
    rows = []
    for a, b in tqdm(pairs, desc="ridge maps", disable=None if progress else True, leave=False):
        row = align_pair(states[a], states[b], seed, (other[a], other[b]) if other else None)
        rows.append({"from": a, "to": b, "width_from": states[a].shape[1], "width_to": states[b].shape[1], **row})
    return rows


def ridge_init(graph, states: dict[str, torch.Tensor], anchor: str | None = None, seed: int = 0) -> str:
    """Set the graph's projections from Ridge maps (see the module's docstring); returns the anchor's name.
    `states`: pooled states of every node on the training questions (`pooled_states`)."""
    anchor = anchor or graph.refiners[0]
    if anchor not in states:
        from .errors import UserError

        raise UserError(f"--init-anchor {anchor!r} is not a node of this graph ({', '.join(states)})")
    latent = graph.spec.latent_dim
    a = states[anchor]
    _, _, vh = torch.linalg.svd(a - a.mean(0), full_matrices=False)
    basis = vh[:latent].T                                  # (d_anchor, r): the leading principal directions
    if basis.shape[1] < latent:                            # fewer rows or a narrower anchor: complete the basis
        extra = torch.randn(a.shape[1], latent - basis.shape[1], generator=torch.Generator().manual_seed(seed),
                            dtype=a.dtype)
        extra -= basis @ (basis.T @ extra)
        basis = torch.cat([basis, extra / extra.norm(dim=0).clamp_min(1e-12)], 1)
    z = (a - a.mean(0)) @ basis                            # the anchor's coordinates in the latent
    maps = {name: [] for name in states}         # node -> (weight to set, transposed?) of each of its maps
    for site in graph.sites:
        if site.edge.source in states and site.key in graph.project:
            maps[site.edge.source].append((graph.project[site.key].weight, True))
        if site.key in graph.carry and site.edge.target in states:
            maps[site.edge.target].append((graph.carry[site.key].weight, False))
    for name in graph.readout:
        if name in states:
            maps[name].append((graph.readout[name].weight, True))
    with torch.no_grad():
        for name, node_states in states.items():
            if not maps[name]:
                continue
            if name == anchor and basis.shape[0] == node_states.shape[1]:
                weight = basis
            else:
                weight = fit(node_states, z, seed=seed).weight
            for target, transposed in maps[name]:
                target.copy_((weight.T if transposed else weight).to(target.dtype))
    return anchor


def write_alignment(rows: list[dict], run_dir, title: str) -> list:
    """alignment.csv (every pair), alignment.md (the table) and alignment.png (R^2 heatmaps) in `run_dir`."""
    import csv
    from pathlib import Path

    from .files import atomic_file
    from .plots import plot_alignment

    run_dir = Path(run_dir)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_file(run_dir / "alignment.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    other = "r2_other_task" in columns
    lines = [f"# {title}", "", "Held-out R^2 of a closed-form Ridge map from one node's pooled states to another's "
             "(lambda chosen by 5-fold cross-validation on 80% of the questions, scored on the other 20%); the "
             "permutation control fits the same map to shuffled pairs." + (" The last column scores the map on the "
                                                                            "second task." if other else ""), "",
             "| from | to | R^2 held out | R^2 permuted | lambda |" + (" R^2 other task |" if other else ""),
             "|---|---|---|---|---|" + ("---|" if other else "")]
    for r in rows:
        lines.append(f"| {r['from']} | {r['to']} | {r['r2']:.3f} | {r['r2_permuted']:.3f} | {r['lambda']:.3g} |"
                     + (f" {r['r2_other_task']:.3f} |" if other else ""))
    with atomic_file(run_dir / "alignment.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return [run_dir / "alignment.csv", run_dir / "alignment.md", plot_alignment(rows, run_dir / "alignment.png",
                                                                                 title)]
