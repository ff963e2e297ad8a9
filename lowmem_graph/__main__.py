"""`python -m lowmem_graph ...` is `lowmem-graph ...` (and what `torchrun -m lowmem_graph` runs)."""
import sys

from .cli import main

sys.exit(main())
