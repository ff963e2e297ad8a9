"""Ablations as flags and a run matrix: every variant x every seed, tabulated with mean and spread.

A change is `key=value` on the spec: `latent_dim=512`, `injection=token`, `nodes.phi3.blend=0.5`,
`nodes.llama.role=refiner`, `nodes.gemma.pooling=last`; or `drop=NODE` to remove a node. Values are read as
YAML scalars, so numbers and booleans keep their types. The paper reported one run per benchmark; the
matrix runs several seeds so a difference can be told from noise.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import statistics
from pathlib import Path


from .errors import UserError
from .files import atomic_file
from .spec import GraphSpec, from_dict, parse_yaml


def apply_changes(spec: GraphSpec, changes: list[str]) -> GraphSpec:
    """A new, validated spec with `key=value` changes (and `drop=NODE`) applied in order."""
    raw = spec.to_dict()
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep:
            raise UserError(f"change {change!r}: expected key=value (e.g. nodes.phi3.blend=0.5 or drop=gemma)")
        key = key.strip()
        names = [n["name"] for n in raw["nodes"]]
        if key == "drop":
            if value not in names:
                raise UserError(f"drop={value}: no node named {value!r} (nodes: {', '.join(names)})")
            raw["nodes"] = [n for n in raw["nodes"] if n["name"] != value]
            continue
        parsed = parse_yaml(value, f"--set {change}") if value.strip() else ""
        parts = key.split(".")
        if parts[0] == "nodes":
            if len(parts) != 3 or parts[1] not in names:
                raise UserError(f"change {change!r}: expected nodes.<name>.<field> with a name among {names}")
            raw["nodes"][names.index(parts[1])][parts[2]] = parsed
        elif parts[0] == "output" and len(parts) == 2:
            raw["output"][parts[1]] = parsed
        elif len(parts) == 1:
            raw[key] = parsed
        else:
            raise UserError(f"change {change!r}: unknown key {key!r}")
    return from_dict(raw, f"{spec.name} with {', '.join(changes)}" if changes else spec.name)


def variants(vary: list[str]) -> list[list[str]]:
    """`key=v1,v2` axes -> the cartesian product as lists of changes ([[]] when nothing varies)."""
    axes = []
    for axis in vary:
        key, sep, values = axis.partition("=")
        if not sep or not values:
            raise UserError(f"--vary {axis!r}: expected key=v1,v2,... (e.g. nodes.phi3.inject_depth=0.5,0.75)")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def run_matrix(spec: GraphSpec, cfg, vary: list[str], seeds: list[int], out_dir: str | Path,
               progress: bool = True, log=print) -> list[dict]:
    """Train every variant with every seed (run folders under out_dir), then write matrix.{csv,md,json}."""
    from .train import train

    out_dir = Path(out_dir)
    plans = [(changes, apply_changes(spec, changes)) for changes in variants(vary)]   # validate all first
    rows = []
    for changes, variant in plans:
        label = ", ".join(changes) or "as specified"
        for seed in seeds:
            run = out_dir / (("_".join(c.replace("=", "-") for c in changes) or "base") + f"-seed{seed}")
            log(f"variant [{label}] seed {seed} -> {run}")
            summary = train(variant, dataclasses.replace(cfg, seed=seed), run, progress=progress, log=log)
            rows.append({"variant": label, "seed": seed, "eval_acc": summary["eval_acc"], "run_dir": str(run)})
    _write(rows, out_dir, cfg)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for label in dict.fromkeys(r["variant"] for r in rows):
        accs = [r["eval_acc"] for r in rows if r["variant"] == label]
        table.append({"variant": label, "seeds": len(accs), "mean": statistics.fmean(accs),
                      "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min": min(accs), "max": max(accs)})
    return table


def _write(rows: list[dict], out_dir: Path, cfg) -> None:
    with atomic_file(out_dir / "matrix.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_file(out_dir / "matrix.json") as tmp:
        tmp.write_text(json.dumps({"runs": rows, "summary": summarise(rows)}, indent=1))
    lines = [f"{cfg.task} {cfg.eval_split} accuracy over seeds (mean ± sample std)", "",
             "| variant | seeds | mean | std | min | max |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['seeds']} | {r['mean']:.3f} | {r['std']:.3f} | {r['min']:.3f} | {r['max']:.3f} |"
              for r in summarise(rows)]
    with atomic_file(out_dir / "matrix.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
