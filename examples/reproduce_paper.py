"""Reproduce "Dead Weights, Live Signals" on your GPU (downloads the five models and the data from the hub):

    python examples/reproduce_paper.py                       # the paper's graph and protocol
    python examples/reproduce_paper.py --data-dir DIR        # official local files instead of the hub
    python examples/reproduce_paper.py --preset tiny --data-dir ../shared/data --limit-train 64 --limit-test 64

The protocol (training data, epochs, benchmarks) is lowmem_graph/presets/reproduce_paper.yaml; pass
--protocol FILE for your own. Writes results.md (ours beside the paper's numbers) in the run folder.
Equivalent to `lowmem-graph reproduce ...`.
"""
import sys

from lowmem_graph.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
