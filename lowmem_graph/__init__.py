"""lowmem-graph: train graphs of frozen 4-bit language models on one small GPU."""
import logging

# bitsandbytes warns at import that the optional Hugging Face `kernels` package is missing; its fallback is fine.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .version import __version__  # noqa: F401


def __getattr__(name):
    """`from lowmem_graph import TrainedGraph, export_run` without importing torch for `lowmem-graph --help`."""
    if name in ("TrainedGraph", "export_run"):
        from . import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'lowmem_graph' has no attribute {name!r}")
