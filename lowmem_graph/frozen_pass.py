"""The model-major frozen pass: every node once over the whole data set, one model after the other.

Everything before an injection point depends on the input alone: the readers' states and each refiner's residual
stream entering its injection layer. So each node runs once per data set, placed on the device as the run's
placement says (`Placement.frozen_pass`), and what it produces goes to the prefix cache; training and evaluation
then run only the refiners' upper layers. Prompts run longest first, so a micro-batch wastes little on padding.
"""
from __future__ import annotations

import torch

from .cache import EdgeStates, FrozenStates, PrefixCache, entry_key, fingerprint
from .data import Question, format_prompt
from .errors import UserError


def run_frozen_pass(graph, questions: list[Question], cache: PrefixCache, placement, batch_size: int = 16,
                    progress: bool = True) -> FrozenStates:
    """Each node over all `questions` (entries already cached are reused), `batch_size` prompts per forward. Under
    several ranks (torchrun) each computes its slice of the prompts and writes its shards; rank 0 the manifests."""
    from .distributed import current, shard_batches
    from .edge_graph import EdgeGraph

    ranks = current()
    if isinstance(graph, EdgeGraph):
        return run_edge_frozen_pass(graph, [(q.id, format_prompt(q)) for q in questions], cache, batch_size,
                                    progress, placement)
    ids = [q.id for q in questions]
    texts = [format_prompt(q) for q in questions]
    entries = {}
    for name, node, reader, pooled, what, key in _entries(graph, questions):
        entry = cache.load_shared(key, ranks)
        if entry is None:
            lengths = node.token_lengths(texts)
            order = sorted(range(len(texts)), key=lambda i: -lengths[i])      # longest first: little padding
            with placement.frozen_pass(node):
                mine = shard_batches(order, batch_size, ranks)
                rows = _rows(node, reader, pooled, [texts[i] for i in mine], batch_size, progress)
                entry = cache.save(key, rows, order, {"node": name, "model": node.spec.model, "what": what},
                                   _entry_bytes(node, pooled, lengths), ranks)
        entries[name] = entry
    return FrozenStates({q: i for i, q in enumerate(ids)}, entries)


def _entries(graph, questions: list[Question]):
    """(name, node, reader, pooled, what it caches, entry key) of each node's entry for these questions."""
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise UserError("question ids repeat in this data set; the prefix cache needs unique ids")
    data = fingerprint([(q.id, format_prompt(q)) for q in questions])
    for name, node in graph.nodes.items():
        reader = name in graph.readers
        pooled = reader and graph.spec.injection == "pooled"
        what = (("tokens" if not pooled else node.spec.pooling, node.read_layer) if reader
                else ("prefix", node.inject_layer))
        yield name, node, reader, pooled, what, entry_key(node, what, data)


def _entry_bytes(node, pooled: bool, lengths: list[int]) -> int:
    """An entry's size on disk: a pooled fp32 row per prompt, or a row per token in the node's dtype."""
    return 4 * node.width * len(lengths) if pooled else node.model.dtype.itemsize * node.width * sum(lengths)


def check_cache_room(graph, question_sets: list[list[Question]], cache: PrefixCache) -> None:
    """Refuse, before the first node runs, a frozen pass whose missing entries (every node, every set) the disk
    cannot hold: each entry's own check would only refuse once the entries before it were written."""
    import shutil

    needed = 0
    for questions in question_sets:
        texts = [format_prompt(q) for q in questions]
        for _, node, _, pooled, _, key in _entries(graph, questions):
            if not (cache.root / key).exists():
                needed += _entry_bytes(node, pooled, node.token_lengths(texts))
    cache.root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache.root).free
    if needed > free:
        raise UserError(f"the frozen pass will write about {needed / 2 ** 30:.1f} GiB to the prefix cache, but "
                        f"{cache.root} has {free / 2 ** 30:.1f} GiB free: free some space or set cache_dir to a "
                        "larger disk")


def _rows(node, reader: bool, pooled: bool, texts: list[str], batch_size: int, progress: bool):
    """One node over all prompts, yielding per prompt a reader's states (per token in the node's dtype, or
    pooled in fp32) or a refiner's stream entering its injection layer."""
    from .progress import progress as bar

    starts = range(0, len(texts), batch_size)
    for start in bar(starts, len(starts), f"caching {node.spec.name} batch", progress):
        enc = node.encode(texts[start:start + batch_size])
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if reader:
            out = node.read(ids, mask)
            out = node.pool(out.float(), mask)[:, None] if pooled else out
        else:
            out = node.prefix(ids, mask)
        yield from (o.cpu() if pooled else o[: int(m.sum())].cpu() for o, m in zip(out, mask))


def run_edge_frozen_pass(graph, items: list[tuple[str, str]], cache: PrefixCache, batch_size: int = 16,
                         progress: bool = True, placement=None) -> EdgeStates:
    """The frozen pass of a graph given by its edges over (id, text) items: each node's input-only parts
    (`EdgeGraph.frozen_parts`: the stream entering its lowest written layer, the reads below it), one entry each,
    the node placed as `placement` says (its layers up to the highest part; None: the nodes are on the device)."""
    import contextlib

    from .distributed import current, shard_batches

    from .edge_graph import _run_layer, part_key
    from .nodes import pool

    ranks = current()
    ids, texts = [i for i, _ in items], [t for _, t in items]
    if len(set(ids)) != len(ids):
        raise UserError("item ids repeat in this data set; the prefix cache needs unique ids")
    data = fingerprint(list(zip(ids, texts)))
    entries = {}
    for name, node in graph.nodes.items():
        parts = graph.frozen_parts(name)
        needed = max((layer + (kind != "prefix") for kind, layer in parts), default=0)
        for kind, layer in parts:
            key = entry_key(node, (kind, layer), data)
            entry = cache.load_shared(key, ranks)
            if entry is None:
                lengths = node.token_lengths(texts)
                order = sorted(range(len(texts)), key=lambda i: -lengths[i])
                pooled = kind in ("mean", "last")
                per_row = 4 * node.width if pooled else node.model.dtype.itemsize * node.width
                expected = per_row * (len(texts) if pooled else sum(lengths))

                def rows(kind=kind, layer=layer, node=node, order=shard_batches(order, batch_size, ranks),
                         pooled=pooled):
                    from .progress import progress as bar

                    starts = range(0, len(order), batch_size)
                    for start in bar(starts, len(starts), f"caching {node.spec.name} {kind} batch", progress):
                        enc = node.encode([texts[i] for i in order[start:start + batch_size]])
                        ids, mask = enc["input_ids"], enc["attention_mask"]
                        with torch.no_grad():
                            h, calls = node.layer_calls(ids, mask, start=layer)
                            if kind != "prefix":
                                with node._autocast():
                                    h = node.base.norm(_run_layer(calls[0], h))
                            out = pool(h.float(), mask, kind)[:, None] if pooled else h
                        yield from (o.cpu() if pooled else o[: int(m.sum())].cpu() for o, m in zip(out, mask))

                placed = placement.frozen_pass(node, needed) if placement else contextlib.nullcontext()
                with placed:
                    entry = cache.save(key, rows(), order, {"node": name, "model": node.spec.model,
                                                            "what": (kind, layer)}, expected, ranks)
            entries[part_key(kind, name, layer)] = entry
    return EdgeStates({i: r for r, i in enumerate(ids)}, entries)
