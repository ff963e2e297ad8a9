"""`python -m lowmem_graph ...` is `lowmem-graph ...` (and what `torchrun -m lowmem_graph` runs)."""
import sys
from pathlib import Path

# Run from a checkout, `-m` puts its root first on sys.path, where our kernels/ folder would answer bitsandbytes'
# and transformers' `import kernels` (the Hugging Face kernels hub). The package itself is imported by now.
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "kernels" / "inject.py").exists():
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

from .cli import main  # noqa: E402

sys.exit(main())
