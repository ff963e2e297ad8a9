"""lowmem-graph: train graphs of frozen 4-bit language models on one small GPU."""
import logging

# bitsandbytes warns at import that the optional Hugging Face `kernels` package is missing; its fallback is fine.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
