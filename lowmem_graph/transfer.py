"""Every transfer of a micro-batch's inputs to the device, decided in one place.

A micro-batch carries token ids, attention masks, character offsets, cross-tokenizer indices, labels and, when it
trains from the prefix cache, the frozen pass's states. The data thread (fit's next step, evaluation's next batch)
packs them into one page-locked buffer per device they go to (`pack`); the step moves each buffer with one
non-blocking copy and takes its tensors as views of it (`arrive`). So nothing inside a step copies pageable memory to
a device (on CUDA such a copy holds the host until it lands), the copy overlaps the previous micro-batch's compute,
and one copy replaces a dozen small ones. Where every tensor stays where it is (a CPU run) nothing is packed.

Where each tensor goes (`destinations`): a node's tokens, attention masks (the 2D one and those its layers take,
made at collation: masks.py) and predicted positions to the device that node computes on (its character offsets
stay on the host: collation read them); an index into a source node's states to the source's device (the gather
runs where the states are); the labels, the choice counts and every cached state but a prefix to the device of
the trained parts; a cached prefix to its node's device.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from .memory.host import page_locked_empty

ALIGN = 64          # bytes: every tensor starts where a view of any dtype may start


@dataclass
class Packed:
    """A micro-batch as the data thread left it: the batch and states on the host, and what moves, packed."""
    batch: object                               # graph.Batch, its tensors on the host
    states: dict | None                         # cached part key -> host tensor, or None
    buffers: dict[torch.device, torch.Tensor]   # device -> the page-locked bytes that go there
    slots: dict[tuple, tuple]                   # tensor's place -> (device, byte offset, dtype, shape)


def destinations(graph, batch, states: dict | None = None) -> dict[tuple, tuple[torch.Tensor, torch.device]]:
    """Every tensor a micro-batch carries, by its place in the batch or states, with the device it is used on."""
    main = next(graph.parameters()).device

    def node(name):
        return graph.nodes[name].device

    out = {}
    for name, (ids, mask) in batch.tokens.items():
        out["tokens", name, 0], out["tokens", name, 1] = (ids, node(name)), (mask, node(name))
    out["labels"], out["n_choices"] = (batch.labels, main), (batch.n_choices, main)
    for pair, index in (batch.align or {}).items():
        out["align", pair] = index, node(pair[0])
    for name, offsets in (batch.offsets or {}).items():
        if offsets is not None:         # read on the host only, at collation (alignment, predicted positions)
            out["offsets", name] = offsets, offsets.device
    for name, picks in (batch.picks or {}).items():
        out["picks", name] = picks, node(name)
    for name, masks in (batch.masks or {}).items():
        for kind, mask in (masks or {}).items():
            if mask is not None:
                out["masks", name, kind] = mask, node(name)
    for key, tensor in (states or {}).items():
        out["states", key] = tensor, node(key.split(":")[1]) if key.startswith("prefix:") else main
    return out


def pack(graph, batch, states: dict | None = None) -> Packed:
    """On the data thread: every tensor that is not yet where it is used, copied into one page-locked buffer per
    device, each at an `ALIGN`ed offset."""
    moving: dict[torch.device, list] = {}
    for place, (tensor, device) in destinations(graph, batch, states).items():
        if tensor.device != device:
            moving.setdefault(device, []).append((place, tensor))
    buffers, slots = {}, {}
    for device, tensors in moving.items():
        offsets, size = [], 0
        for _, tensor in tensors:
            offsets.append(size)
            size += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        buffer = page_locked_empty((size,), torch.uint8)
        for (place, tensor), offset in zip(tensors, offsets):
            slots[place] = (device, offset, tensor.dtype, tuple(tensor.shape))
            _view(buffer, slots[place]).copy_(tensor)
        buffers[device] = buffer
    return Packed(batch, states, buffers, slots)


def arrive(packed: Packed) -> tuple:
    """In the step: one non-blocking copy per device, and the batch and states rebuilt from views of the copies.
    Returns (batch, states), states None when the micro-batch has none."""
    copies = {device: buffer.to(device, non_blocking=True) for device, buffer in packed.buffers.items()}
    placed = {place: _view(copies[slot[0]], slot) for place, slot in packed.slots.items()}
    return rebuilt(packed.batch, packed.states, placed)


def rebuilt(batch, states: dict | None, placed: dict[tuple, torch.Tensor]) -> tuple:
    """`batch` and `states` with the tensors in `placed` (by place, as `destinations` names them) put in."""
    def get(place, tensor):
        return placed.get(place, tensor)

    tokens = {name: (get(("tokens", name, 0), ids), get(("tokens", name, 1), mask))
              for name, (ids, mask) in batch.tokens.items()}
    align = None if batch.align is None else {pair: get(("align", pair), i) for pair, i in batch.align.items()}
    offsets = None if batch.offsets is None else {name: None if o is None else get(("offsets", name), o)
                                                  for name, o in batch.offsets.items()}
    picks = None if batch.picks is None else {name: get(("picks", name), p) for name, p in batch.picks.items()}
    masks = None if batch.masks is None else {name: None if m is None else {k: get(("masks", name, k), v)
                                                                           for k, v in m.items()}
                                              for name, m in batch.masks.items()}
    moved = dataclasses.replace(batch, tokens=tokens, labels=get("labels", batch.labels),
                                n_choices=get("n_choices", batch.n_choices), align=align, offsets=offsets,
                                picks=picks, masks=masks)
    return moved, None if states is None else {key: get(("states", key), t) for key, t in states.items()}


def ahead(make: Callable, inputs: Iterable) -> Iterator:
    """`make(x)` for each of `inputs`, each made on another thread while the caller works on the one before."""
    inputs = iter(inputs)
    with ThreadPoolExecutor(1) as thread:
        upcoming = next((thread.submit(make, x) for x in inputs), None)
        while upcoming is not None:
            made = upcoming.result()
            upcoming = next((thread.submit(make, x) for x in inputs), None)
            yield made


def _view(buffer: torch.Tensor, slot: tuple) -> torch.Tensor:
    _, offset, dtype, shape = slot
    size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    return buffer[offset:offset + size].view(dtype).view(shape)
