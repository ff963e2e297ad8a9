"""lowmem-graph: train graphs of frozen 4-bit language models on one small GPU."""

__version__ = "0.1.0"
