import os

# Triton on CPU only works through its interpreter, and the flag must be set before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
