"""The model-major frozen pass: every node once over the whole data set, one model after the other.

For every node, what lies below its lowest written layer depends on the input alone (`EdgeGraph.frozen_parts`:
the stream entering that layer, and the reads below it). So each node runs once per data set, placed on the device
as the run's placement says (`Placement.frozen_pass`), and what it produces goes to the prefix cache; training and
evaluation then run only the layers above. Prompts run longest first, so a micro-batch wastes little on padding.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time

import torch

from .cache import EdgeStates, PrefixCache, entry_key, fingerprint
from .distributed import current, shard_batches
from .edge_graph import _run_layer, part_key
from .errors import UserError
from .nodes import pool
from .progress import progress as bar


def run_frozen_pass(graph, items: list[tuple[str, str]], cache: PrefixCache, batch_size: int = 16,
                    progress: bool = True, placement=None) -> EdgeStates:
    """Each node's input-only parts over (id, text) items, one cache entry each (entries already cached are
    reused), `batch_size` texts per forward, the node placed as `placement` says (its layers up to the highest
    part; None: the nodes are on the device). Under several ranks (torchrun) each computes its slice of the texts
    and writes its shards; rank 0 the manifests."""
    ranks = current()
    ids, texts = [i for i, _ in items], [t for _, t in items]
    entries, missing = {}, []
    for name, node, kind, layer, key in _entries(graph, items):
        entries[part_key(kind, name, layer)] = cache.load_shared(key, ranks)
        if entries[part_key(kind, name, layer)] is None:
            missing.append((name, node, kind, layer, key, node.token_lengths(texts)))
    estimate = Estimate(graph, missing, len(texts)) if progress and missing else None
    for name, node, kind, layer, key, lengths in missing:
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])      # longest first: little padding
        needed = highest_part(graph, name)
        label = node.spec.name if len(graph.frozen_parts(name)) == 1 else f"{node.spec.name} {kind} {layer + 1}"
        mine = shard_batches(order, batch_size, ranks)
        rows = _rows(node, kind, layer, [texts[i] for i in mine], batch_size, progress and label,
                     estimate and estimate.timer(name, [lengths[i] for i in mine[batch_size:4 * batch_size]],
                                                 batch_size), keep_start=graph.objective == "lm")
        with placement.frozen_pass(node, needed) if placement else contextlib.nullcontext():
            entries[part_key(kind, name, layer)] = cache.save(
                key, rows, order, {"node": name, "model": node.spec.model, "what": (kind, layer)},
                _entry_bytes(node, kind, lengths), ranks)
    return EdgeStates({i: r for r, i in enumerate(ids)}, entries)


class Estimate:
    """How long the whole frozen pass will take, said once batches 2 to 4 are timed (the first pays for warm-up):
    each node's work counted as tokens x layers run x width^2 (see `_unit`), at their median seconds per unit. The
    longest prompts run first, so it errs long."""

    def __init__(self, graph, missing: list, n_texts: int):
        self.graph, self.n_texts = graph, n_texts
        self.units = {name: self._unit(name, node) for name, node, *_ in missing}
        self.total = sum(self._unit(name, node) * sum(lengths) for name, node, *_, lengths in missing)
        self.nodes = len({name for name, *_ in missing})
        self.said = False

    def _unit(self, name: str, node) -> int:
        """A layer's cost per token: its width squared, or (narrower than 1024) a constant, for so small a layer
        costs its calls' overhead more than its arithmetic."""
        return highest_part(self.graph, name) * max(node.width, 1024) ** 2

    def timer(self, name: str, lengths: list[int], batch_size: int):
        """The callback `_rows` calls with a batch's seconds; `lengths`: the tokens of the texts of batches 2 to 4
        (None once the estimate was given)."""
        if self.said or not lengths:
            return None
        tokens = sum(lengths) / -(-len(lengths) // batch_size)          # per timed batch, on average

        def timed(seconds: float) -> None:
            self.said = True
            total = seconds * self.total / (self.units[name] * tokens)
            when = f"about {total:.0f} s" if total < 90 else f"about {total / 60:.0f} min"
            _say(f"frozen pass: {self.n_texts:,} texts through {self.nodes} node{'s' * (self.nodes != 1)}, "
                 f"{when} (timed on its first batches; cached for later runs)")
        return timed


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _entries(graph, items: list[tuple[str, str]]):
    """(name, node, kind, layer, entry key) of every node's input-only parts for these items."""
    ids = [i for i, _ in items]
    if len(set(ids)) != len(ids):
        raise UserError("ids repeat in this data set; the prefix cache needs unique ids")
    data = fingerprint(list(items))
    for name, node in graph.nodes.items():
        for kind, layer in graph.frozen_parts(name):
            yield name, node, kind, layer, entry_key(node, (kind, layer), data)


def _entry_bytes(node, kind: str, lengths: list[int]) -> int:
    """An entry's size on disk: a pooled fp32 row per text, or a row per token in the node's dtype."""
    if kind in ("mean", "last"):
        return 4 * node.width * len(lengths)
    return node.model.dtype.itemsize * node.width * sum(lengths)


def check_cache_room(graph, item_sets: list[list[tuple[str, str]]], cache: PrefixCache) -> None:
    """Refuse, before the first node runs, a frozen pass whose missing entries (every node, every set) the disk
    cannot hold: each entry's own check would only refuse once the entries before it were written."""
    needed = 0
    for items in item_sets:
        texts = [t for _, t in items]
        for _, node, kind, _, key in _entries(graph, items):
            if not (cache.root / key).exists():
                needed += _entry_bytes(node, kind, node.token_lengths(texts))
    cache.root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache.root).free
    if needed > free:
        raise UserError(f"the frozen pass will write about {needed / 2 ** 30:.1f} GiB to the prefix cache, but "
                        f"{cache.root} has {free / 2 ** 30:.1f} GiB free: free some space or set cache_dir to a "
                        "larger disk")


def _rows(node, kind: str, layer: int, texts: list[str], batch_size: int, progress, timed=None,
          keep_start: bool = False):
    """One node over all texts, yielding per text its part: the stream entering `layer` ("prefix"), or the
    states read at `layer`'s output through the final norm, per token in the node's dtype or pooled in fp32.
    `progress`: the label of its progress bar (the node, and the part where it has several), or False. `timed`:
    called with the median seconds of batches 2 to 4 (see Estimate). `keep_start`: texts cut as the lm
    objective's collate cuts them (FrozenNode.encode)."""
    pooled = kind in ("mean", "last")
    starts, seconds = range(0, len(texts), batch_size), []
    for start in bar(starts, len(starts), f"caching {progress} batch", bool(progress)):
        began = time.perf_counter()
        enc = node.encode(texts[start:start + batch_size], keep_start=keep_start)
        out = frozen_part(node, kind, layer, enc["input_ids"], enc["attention_mask"])
        if timed is not None and start:         # batches 2 to 4 (the first pays for warm-up): their median
            if out.device.type == "cuda":
                torch.cuda.synchronize(out.device)      # a sync point, three times per pass: the estimate's clock
            seconds.append(time.perf_counter() - began)
            if len(seconds) == 3 or start + batch_size >= len(texts):
                timed(sorted(seconds)[len(seconds) // 2])
                timed = None
        yield from (o[None].cpu() if pooled else o[: int(m.sum())].cpu() for o, m in zip(out, enc["attention_mask"]))


@torch.no_grad()
def frozen_part(node, kind: str, layer: int, input_ids, attention_mask) -> torch.Tensor:
    """One batch's part: the stream entering `layer` ("prefix", (B, T, d)), or what is read at `layer`'s output
    through the final norm, per token ("tokens", (B, T, d)) or pooled in fp32 ("mean", "last": (B, d))."""
    h, calls = node.layer_calls(input_ids, attention_mask, start=layer)
    if kind == "prefix":
        return h
    with node._autocast():
        h = node.norm(_run_layer(calls[0], h))
    return pool(h.float(), attention_mask, kind) if kind in ("mean", "last") else h


def highest_part(graph, name: str) -> int:
    """How many of a node's layers its frozen pass runs: up to its highest input-only part."""
    return max(layer + (kind != "prefix") for kind, layer in graph.frozen_parts(name))
