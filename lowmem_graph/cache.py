"""The frozen-prefix cache: input-only work done once per data set and kept on disk.

Readers' states and each refiner's residual stream at its injection layer depend on the input alone, so the
model-major frozen pass (`FrozenGraph.precompute`) runs each node once over the whole data set and stores the
result here. Training then runs only the refiners' upper layers, the projections and the output node.

An entry is `<key>.safetensors` (rows of variable length, flattened, with their offsets) and `<key>.sha256`,
written last. The key hashes everything the states depend on: the node's exact weights and quantisation, the
layer, pooling, framing prefix, tokenizer, prompt format, maximum length and the questions. An entry whose
checksum does not match (truncated, corrupted, half-written) is deleted and rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import atomic_file, file_sha256

PROMPT_FORMAT = 1   # bump when data.format_prompt or the entry layout changes


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids; not the padding/truncation state a call leaves on the backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        config = json.loads(backend.to_str())
        config.pop("padding", None)
        config.pop("truncation", None)
        text = json.dumps(config, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


class CacheEntry:
    """Read access to one verified entry: row i is flat[offsets[i]:offsets[i+1]], read lazily from disk."""

    def __init__(self, path: Path):
        self._file = safe_open(str(path), framework="pt")
        self.offsets = self._file.get_tensor("offsets")
        self._flat = self._file.get_slice("flat")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> torch.Tensor:
        return self._flat[int(self.offsets[i]):int(self.offsets[i + 1])]


class PrefixCache:
    def __init__(self, root: str | Path, log=None):
        self.root = Path(root)
        self.log = log or (lambda message: warnings.warn(message, stacklevel=2))

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.sha256"

    def load(self, key: str) -> CacheEntry | None:
        """The entry if present and intact; a damaged one is removed (and reported) so it gets rebuilt."""
        data, digest = self._paths(key)
        if not data.exists() and not digest.exists():
            return None
        try:
            intact = digest.read_text().strip() == file_sha256(data)
            entry = CacheEntry(data) if intact else None
        except Exception:   # missing half, unreadable header: the same verdict
            entry = None
        if entry is None:
            self.log(f"prefix cache entry {data.name} is damaged or incomplete: rebuilding it")
            data.unlink(missing_ok=True)
            digest.unlink(missing_ok=True)
        return entry

    def save(self, key: str, rows: list[torch.Tensor], info: dict) -> CacheEntry:
        data, digest = self._paths(key)
        lengths = torch.tensor([len(r) for r in rows])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        with atomic_file(data) as tmp:
            save_file({"flat": torch.cat(rows).contiguous(), "offsets": offsets}, str(tmp),
                      metadata={"info": json.dumps(info, default=str)})
        with atomic_file(digest) as tmp:
            tmp.write_text(file_sha256(data) + "\n")
        return CacheEntry(data)
