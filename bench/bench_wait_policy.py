"""What OpenMP's wait policy does to a CPU run on a busy machine: the frozen pass and the scoring of N test
questions of a trained run, timed in one process with a fresh prefix cache. Run it twice, spinning and sleeping:

    OMP_WAIT_POLICY=ACTIVE  python bench/bench_wait_policy.py runs/tiny-<time> 160 2
    OMP_WAIT_POLICY=PASSIVE python bench/bench_wait_policy.py runs/tiny-<time> 160 2

The last argument starts that many busy processes for the measurement (a busy machine made repeatable; 0: none).

(`lowmem-graph` itself sets PASSIVE unless the variable is set; the variable must be set before torch loads.)
"""
import multiprocessing
import os
import sys
import tempfile
import time

from lowmem_graph.predict import TrainedGraph
from lowmem_graph.train import load_questions
from lowmem_graph.evaluate import evaluate


def _busy() -> None:
    while True:
        pass


def main(run: str, n: int, busy: int) -> None:
    others = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(busy)]
    for p in others:
        p.start()
    with tempfile.TemporaryDirectory() as cache:
        graph = TrainedGraph(run, cache_dir=cache, log=lambda *_: None)
        questions = load_questions("arc-easy", "test", None, n)
        began = time.perf_counter()
        (states,) = graph.placed.frozen_states(questions)
        frozen = time.perf_counter() - began
        graph.placed.start_steps()
        began = time.perf_counter()
        evaluate(graph.placed.graph, questions, graph.placed.micro_batch, False, states=states)
        scoring = time.perf_counter() - began
    for p in others:
        p.terminate()
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}: {n} questions, {busy} busy processes "
          f"beside: frozen pass {frozen:.2f} s, scoring {scoring:.2f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 160, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
