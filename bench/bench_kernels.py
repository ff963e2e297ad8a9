"""Injection-op benchmark: eager vs torch.compile vs Triton at the paper's shapes; see bench/kernel_bench.py.

    python bench/bench_kernels.py [--out bench/results] [--quick] [--smoke]

Without a CUDA device it prints one line, writes nothing and exits 3: it measured nothing (--smoke: the same code on
the CPU, tiny shapes).
"""
import argparse
import sys

from kernel_bench import add_bench_options, run_kernel_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_options(parser)
    args = parser.parse_args()
    sys.exit(0 if run_kernel_bench(args.out, args.quick, args.smoke) is not None else 3)
