"""Loading under a host budget: how much memory a run holds while its nodes load and their disk-tier groups go to
the node cache on disk (graph.load_nodes with memory/placement.py's Placement.spill after each node), against the
plan's host figure for its frozen nodes.

The tiny preset with its `llama` reader swapped for a Llama-shaped model scaled to a few hundred MB of NF4, built
and quantised once (the node cache's copy), then loaded in a fresh process on the CPU under a `--host-mem` that
puts most of its layer groups on disk. Sampled every 2 ms from /proc/self/status: anonymous memory (RssAnon: what
the run holds) and file-backed resident pages (RssFile: page cache mapped into the process, which the kernel can
drop), above the process after its imports, during each node's load and during its spill, and at the end.
Writes bench/results/load-memory-cpu.md.

    python bench/bench_load_memory.py [--width 1536 --layers 16 --vocab 8000 --disk 0.8] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 2 ** 30


def graph_spec(model: str):
    """The tiny preset, its `llama` reader the scaled model."""
    import dataclasses

    from lowmem_graph.spec import load_preset

    spec = load_preset("tiny")
    nodes = [dataclasses.replace(n, model=model) if n.name == "llama" else n for n in spec.nodes]
    return dataclasses.replace(spec, nodes=nodes)


def plan_for(spec, disk: float):
    """The plan under a host budget that puts about `disk` of the scaled node's layers on disk."""
    from lowmem_graph.memory.search import make_plan

    roomy = make_plan(spec, GIB, 8, spec.max_length, 64 * GIB, main="cpu")
    layers = sum(g.bytes for g in roomy.frozen["llama"].groups)
    plan = make_plan(spec, GIB, 8, spec.max_length, roomy.host_peak - int(disk * layers), main="cpu")
    return plan, layers


def child(model: str, disk: float) -> dict:
    """Load the graph's nodes as a planned run does, sampling memory: the figures as JSON on stdout."""
    import threading
    import time

    import torch

    from lowmem_graph import nodes as node_module
    from lowmem_graph.graph import load_nodes
    from lowmem_graph.memory.placement import Placement

    torch.set_num_threads(1)
    spec = graph_spec(model)
    plan, layers = plan_for(spec, disk)

    def status():
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024

    base, phase, peaks, done = status(), ["start"], {}, threading.Event()

    def sample():
        while not done.wait(0.002):
            anon, file = status()
            peak = peaks.setdefault(phase[0], [0, 0])
            peak[0], peak[1] = max(peak[0], anon - base[0]), max(peak[1], file - base[1])

    placement = Placement("cpu", plan)
    real_load, real_spill = node_module.FrozenNode.load.__func__, placement.spill

    def load(cls, node_spec, *args, **kwargs):
        phase[0] = f"{node_spec.name}: load"
        return real_load(cls, node_spec, *args, **kwargs)

    def spill(node):
        phase[0] = f"{node.spec.name}: spill"
        real_spill(node)
        phase[0] = "between"

    node_module.FrozenNode.load = classmethod(load)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    loaded = load_nodes(spec, torch.device("cpu"), torch.device("cpu"), loaded=spill)
    phase[0] = "loaded"
    time.sleep(0.05)
    done.set()
    sampler.join()
    end = status()      # the nodes still held
    del loaded
    disk_bytes = plan.frozen["llama"].disk_bytes
    return {"peaks": peaks, "end": [end[0] - base[0], end[1] - base[1]], "host": plan.host_breakdown,
            "layers": layers, "disk": disk_bytes, "disk_groups": sum(g.disk for g in plan.frozen["llama"].groups),
            "groups": len(plan.frozen["llama"].groups)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--disk", type=float, default=0.8, help="share of the scaled node's layers to put on disk")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], float(args.child[1]))))
        return 0
    sys.path.insert(0, str(HERE))
    from bench_quantise import build

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        env = {**os.environ, "LOWMEM_GRAPH_CACHE": str(scratch / "cache")}
        params = build(scratch / "model", args.width, args.layers, args.vocab)
        # three fresh processes: the first quantises the node into the node cache (nothing on disk yet), the
        # second loads that copy and writes the store, the third loads both
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--child", str(scratch / "model"), str(disk)],
                                          capture_output=True, text=True, check=True, env=env)
                           .stdout.strip().splitlines()[-1]) for disk in (0.0, args.disk, args.disk)]
        nf4 = sum(f.stat().st_size for f in (scratch / "cache" / "nodes").glob("*/model.safetensors"))
    r = runs[1]
    held = r["host"]["frozen_nodes"]
    lines = ["# Loading under a host budget (bench/bench_load_memory.py)", "",
             f"The tiny preset with its `llama` reader a random Llama of width {args.width}, {args.layers} layers, "
             f"vocab {args.vocab} ({params / 1e6:.0f}M parameters; node cache copy {nf4 / GIB:.3f} GiB of NF4 for "
             f"fp32 compute, a CPU run), loaded in fresh processes on the CPU, one torch thread, under a host budget "
             f"that puts {r['disk_groups']} of its {r['groups']} frozen-pass groups on disk ({r['disk'] / GIB:.3f} "
             f"GiB of its {r['layers'] / GIB:.3f} GiB of layers). The plan's host figure for the frozen nodes "
             f"(`frozen_nodes`): {held / GIB:.3f} GiB; its whole host figure {sum(r['host'].values()) / GIB:.3f} "
             "GiB. Memory above the process after its imports, sampled every 2 ms from /proc/self/status: anonymous "
             "(RssAnon, what the run holds) and file-backed (RssFile, mapped page cache the kernel can drop).", "",
             "| run | phase | peak anonymous | peak file-backed |", "|---|---|---|---|"]
    names = ("first run (quantises; nothing on disk)", "second run (loads the NF4 copy, writes the store)",
             "later runs (load the copy and the store)")
    for name, run in zip(names, runs):
        phases = {"llama: load": run["peaks"].get("llama: load", [0, 0]),
                  "llama: spill": run["peaks"].get("llama: spill", [0, 0]),
                  "the other nodes": [max((v[i] for k, v in run["peaks"].items() if not k.startswith("llama")),
                                          default=0) for i in (0, 1)],
                  "at the end": run["end"]}
        for phase, (anon, file) in phases.items():
            lines.append(f"| {name} | {phase} | {anon / GIB:.3f} GiB | {file / GIB:.3f} GiB |")
    for name, run in zip(names[1:], runs[1:]):
        top = max(a for a, _ in run["peaks"].values())
        lines.append(f"\n{name[0].upper() + name[1:]}: peak anonymous memory {top / GIB:.3f} GiB, "
                     f"{(top - held) / GIB:+.3f} GiB against `frozen_nodes`.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load-memory-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
