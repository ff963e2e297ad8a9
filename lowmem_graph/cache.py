"""The frozen-prefix cache: input-only work done once per data set and kept on disk.

What each node reads below its lowest written layer, and its residual stream entering that layer, depend on the
input alone, so the model-major frozen pass (frozen_pass.py) runs each node once over the whole data set and
stores the result here; `EdgeStates` serves it back batch by batch. Training then runs only the layers above, the
maps and the output node.

At the paper's scale one refiner's entry is tens of GB, so an entry is a folder written as the pass goes:
`shard-NNNNN.safetensors` files of whole rows (flattened, with their offsets), each hashed when written, and
`manifest.json` last, with every shard's SHA-256 and the order the rows were computed in (the pass sorts
questions by length to waste no compute on padding). The folder appears under its key only when complete. The
key hashes everything the states depend on: the node's exact weights and quantisation, the layer, pooling,
framing prefix, tokenizer, prompt format, maximum length and the questions. An entry whose shards do not match
their checksums (truncated, corrupted, missing), or whose manifest is not the one written (its own digest binds
its key, the order of the rows and the shards; a shard name must be a plain shard file of the entry), or that
was stored under another key (folders swapped), is deleted and rebuilt, never used. An entry is never a link, nor
holds one: such an entry is refused in one line, nothing deleted or read through it.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import UserError
from .files import atomic_dir, atomic_file, file_sha256, no_links, remove_stale_temps, save_file

PROMPT_FORMAT = 5   # bump when questions.format_prompt, FrozenNode.encode or the entry layout changes
_SHARD = re.compile(r"^shard-\d{5}\.safetensors$")
SHARD_BYTES = 256 * 2 ** 20   # rows held in host memory before they go to disk as one shard


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


def entry_key(node, what, data: str) -> str:
    """The key of one node's entry: everything its states depend on (exact weights and quantisation, layer and
    pooling, framing prefix, maximum length, tokenizer, prompt format, the questions)."""
    return fingerprint(node.identity, what, node.spec.prefix, node.max_length, tokenizer_fingerprint(node.tokenizer),
                       PROMPT_FORMAT, data)[:32]


def _padded(entry: "CacheEntry", rows: list[int], mask: torch.Tensor, name: str) -> torch.Tensor:
    """Per-token rows of an entry, right-padded to the batch's tokens (B, T, d); each must fill its mask."""
    items = [entry.row(r) for r in rows]
    out = items[0].new_zeros(len(items), mask.shape[1], items[0].shape[-1])
    for b, (item, length) in enumerate(zip(items, mask.sum(1).tolist())):
        if len(item) != length:
            raise RuntimeError(f"prefix cache row of {name} has {len(item)} tokens, the batch {length}")
        out[b, : len(item)] = item
    return out


@dataclass
class EdgeStates:
    """The frozen pass of a graph given by its edges: each node's input-only parts (EdgeGraph.frozen_parts), served
    per batch as the one dict `EdgeGraph.forward` takes (part key -> tensor: pooled (B, d) in fp32, per token and
    prefixes (B, T, d) padded to the batch's tokens)."""

    rows: dict[str, int]                 # item id -> row
    entries: dict[str, "CacheEntry"]     # part key ("prefix:gemma2:2") -> entry

    def for_batch(self, graph, batch) -> tuple[dict]:
        """This batch's states where the graph uses them (transfer.py), as the one-tuple `EdgeGraph.forward`'s
        `*cached` takes."""
        from .transfer import arrive, pack
        return (arrive(pack(graph, batch, self.gather(batch)))[1],)

    def gather(self, batch) -> dict:
        """The batch's rows of every part, on the host (pooled (B, d) in fp32; per token (B, T, d) padded)."""
        rows = [self.rows[i] for i in batch.ids]
        out = {}
        for key, entry in self.entries.items():
            kind, name, _ = key.split(":")
            out[key] = (torch.cat([entry.row(r) for r in rows]).float() if kind in ("mean", "last")
                        else _padded(entry, rows, batch.tokens[name][1], name))
        return out


class CacheEntry:
    """Read access to one verified entry: `row(i)` is question i's tensor, read lazily from its shard."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder = folder
        self.shards = manifest["shards"]
        self._ends = list(itertools.accumulate(s["rows"] for s in self.shards))
        self._row_of = [0] * len(manifest["order"])
        for row, question in enumerate(manifest["order"]):
            self._row_of[question] = row
        self._open: dict[int, tuple[torch.Tensor, object]] = {}

    def __len__(self) -> int:
        return len(self._row_of)

    def row(self, i: int) -> torch.Tensor:
        row = self._row_of[i]
        shard = bisect.bisect_right(self._ends, row)
        if shard not in self._open:
            f = safe_open(str(self.folder / self.shards[shard]["file"]), framework="pt")
            self._open[shard] = (f.get_tensor("offsets"), f.get_slice("flat"))
        offsets, flat = self._open[shard]
        local = row - (self._ends[shard - 1] if shard else 0)
        return flat[int(offsets[local]):int(offsets[local + 1])]


class PrefixCache:
    def __init__(self, root: str | Path, log=None, shard_bytes: int = SHARD_BYTES):
        self.root = Path(root)
        self.log = log or (lambda message: warnings.warn(message, stacklevel=2))
        self.shard_bytes = shard_bytes

    def load(self, key: str) -> CacheEntry | None:
        """The entry if present and intact; a damaged one is removed (and reported) so it gets rebuilt."""
        folder = self.root / key
        if not folder.exists() and not folder.is_symlink():
            return None
        no_links(folder, "the prefix cache entry")
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            intact = _manifest_ok(manifest) and manifest["key"] == key     # not another entry's folder
            if intact:
                paths = [folder / s["file"] for s in manifest["shards"]]
                with ThreadPoolExecutor(4) as pool:       # hashlib releases the GIL: shards hash in parallel
                    digests = list(pool.map(file_sha256, paths))
                intact = digests == [s["sha256"] for s in manifest["shards"]]
        except Exception:   # no manifest, unreadable, a shard missing: the same verdict
            intact = False
        if not intact:
            self.log(f"prefix cache entry {folder.name} is damaged, incomplete or another entry's: rebuilding it")
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return CacheEntry(folder, manifest)

    def save(self, key: str, rows: Iterable[torch.Tensor], order: list[int], info: dict,
             expected_bytes: int = 0, ranks=None) -> CacheEntry:
        """Write `rows` (row r belongs to question order[r]) shard by shard as they come; the entry appears under
        `key` only once complete. Refuses up front, in one line, when the disk cannot hold `expected_bytes`.
        Under several `ranks` (a sharded frozen pass) each rank gives the rows of its slice of `order`
        (distributed.shard) and writes them as shards of its own; rank 0 writes the manifest last, once every
        rank's shards are on disk, so the entry is the one a single process writes, row for row."""
        self.root.mkdir(parents=True, exist_ok=True)
        if ranks is not None and ranks.active:
            return self._save_sharded(key, rows, order, info, ranks)
        remove_stale_temps(self.root)           # what killed writes left
        free = shutil.disk_usage(self.root).free
        if expected_bytes > free:
            raise UserError(f"the prefix cache entry of {info.get('node', key)} needs about "
                            f"{expected_bytes / 2 ** 30:.1f} GiB, but {self.root} has {free / 2 ** 30:.1f} GiB free: "
                            "free some space or set cache_dir to a larger disk")
        with atomic_dir(self.root / key) as tmp:
            shards = self._write_shards(tmp, rows, 0)
            manifest = _manifest(key, order, shards, info)
            with atomic_file(tmp / "manifest.json") as path:
                path.write_text(json.dumps(manifest, default=str))
        return CacheEntry(self.root / key, manifest)

    def _write_shards(self, folder: Path, rows: Iterable[torch.Tensor], first: int) -> list[dict]:
        """`rows` as shard files numbered from `first`, each at most `shard_bytes` of rows, hashed when written."""
        shards, pending, held = [], [], 0

        def flush():
            name = f"shard-{first + len(shards):05d}.safetensors"
            lengths = torch.tensor([len(r) for r in pending])
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            save_file({"flat": torch.cat(pending).contiguous(), "offsets": offsets}, str(folder / name))
            shards.append({"file": name, "rows": len(pending), "sha256": file_sha256(folder / name)})
            pending.clear()

        for row in rows:
            pending.append(row)
            held += row.nbytes
            if held >= self.shard_bytes:
                flush()
                held = 0
        if pending:
            flush()
        return shards

    def _save_sharded(self, key: str, rows, order: list[int], info: dict, ranks) -> CacheEntry:
        """The entry written by every rank: its shards into one shared folder (shard numbers rank x 1000 up), the
        manifest by rank 0 once all are there, then the folder renamed into place; every rank returns it."""
        from .distributed import barrier, gather

        parts = self.root / f".{key}.parts"
        if ranks.main:
            shutil.rmtree(parts, ignore_errors=True)      # what a killed sharded pass left
            parts.mkdir()
        barrier(ranks)
        shards = [s for mine in gather(self._write_shards(parts, rows, 1000 * ranks.rank), ranks) for s in mine]
        manifest = _manifest(key, order, shards, info)
        if ranks.main:
            with atomic_file(parts / "manifest.json") as path:
                path.write_text(json.dumps(manifest, default=str))
            if (self.root / key).exists():
                shutil.rmtree(parts)
            else:
                os.replace(parts, self.root / key)
        barrier(ranks)
        return CacheEntry(self.root / key, manifest)

    def load_shared(self, key: str, ranks) -> CacheEntry | None:
        """`load` for several ranks: rank 0 checks the entry (and removes it if damaged); the others read it only
        once rank 0 found it whole, so they all agree on whether it must be built."""
        from .distributed import gather

        if ranks is None or not ranks.active:
            return self.load(key)
        entry = self.load(key) if ranks.main else None
        if not gather(entry is not None, ranks)[0]:
            return None
        return entry if ranks.main else self.load(key)


def _manifest(key: str, order: list[int], shards: list[dict], info: dict) -> dict:
    """An entry's manifest: the key it is stored under (a hash of everything its states depend on), its rows'
    order and its shards, bound together by its digest."""
    if sum(s["rows"] for s in shards) != len(order):
        raise RuntimeError(f"the frozen pass gave {sum(s['rows'] for s in shards)} rows for {len(order)} questions")
    return {"format": PROMPT_FORMAT, "key": key, "info": info, "order": list(order), "shards": shards,
            "digest": _manifest_digest(key, list(order), shards)}


def _manifest_digest(key: str, order: list[int], shards: list[dict]) -> str:
    return fingerprint(key, order, shards)


def _manifest_ok(manifest: dict) -> bool:
    """The manifest as written: this format, its key, shard names that stay inside the entry, the row order a permutation
    of its rows, and its own digest over order and shards."""
    shards, order = manifest.get("shards"), manifest.get("order")
    if manifest.get("format") != PROMPT_FORMAT or not isinstance(shards, list) or not isinstance(order, list):
        return False
    if not all(isinstance(s, dict) and isinstance(s.get("file"), str) and _SHARD.match(s["file"])
               and isinstance(s.get("rows"), int) and s["rows"] >= 0 for s in shards):
        return False
    if sorted(order) != list(range(sum(s["rows"] for s in shards))):
        return False
    return manifest.get("digest") == _manifest_digest(manifest.get("key"), order, shards)


# ---- the cache folder as a user sees it (lowmem-graph cache) ---------------------------------------------------
CACHE_KINDS = {"prefix": "frozen-pass states, one folder per node x question set",
               "nodes": "quantised copies of hub models (NF4), one folder per model and format",
               "tiny": "the tiny test models, built from their configs",
               "llama2c": "llama2.c checkpoints converted to transformers"}


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cache_usage(root: Path) -> list[tuple[str, str, int, float]]:
    """(kind, entry, bytes, modified time) of every entry under the cache root; a prefix entry is named by its
    node, model and question count besides its key."""
    rows = []
    for kind in CACHE_KINDS:
        folder = root / kind
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                name = entry.name
                if kind == "prefix":
                    try:
                        manifest = json.loads((entry / "manifest.json").read_text())
                        info = manifest["info"]
                        name = f"{info['node']} ({info['model']}): {len(manifest['order'])} questions  [{entry.name}]"
                    except (OSError, ValueError, KeyError, TypeError):
                        name = f"{entry.name} (incomplete: rebuilt when needed)"
                rows.append((kind, name, _size(entry), entry.lstat().st_mtime))
    return rows


def clear_cache(root: Path, kind: str) -> tuple[int, int]:
    """Remove every entry of `kind` ("all": every kind); (entries, bytes) freed."""
    import shutil

    kinds = list(CACHE_KINDS) if kind == "all" else [kind]
    entries = freed = 0
    for k in kinds:
        folder = root / k
        if not folder.is_dir():
            continue
        for entry in list(folder.iterdir()):
            freed += _size(entry)
            entries += 1
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return entries, freed
