"""A micro-batch's inputs reach the device as one packed copy per device (transfer.py). On the CPU no device
differs from the host, so the nodes here are told they compute on the meta device: what would cross the bus does,
and the host side (the packed bytes) is checked bit for bit."""
import dataclasses
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lowmem_graph import transfer
from lowmem_graph.edge_graph import EdgeGraph
from lowmem_graph.spec import load_spec

META = torch.device("meta")
COUPLED = Path(__file__).resolve().parents[1] / "examples" / "residual_coupling.yaml"


class Copies(TorchFunctionMode):
    """Every tensor copy to another device: `.to(...)`, `.copy_` and `.cuda()` whose result lies elsewhere."""

    def __init__(self):
        super().__init__()
        self.moves = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ("to", "copy_", "cuda") and isinstance(out, torch.Tensor) and args[0].device != out.device:
            self.moves.append((args[0], out.device, (kwargs or {}).get("non_blocking", False)))
        return out


def every_tensor(value, where=()):
    """(place, tensor) of every tensor inside a batch's fields, walking dicts, tuples and lists."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from every_tensor(getattr(value, f.name), where + (f.name,))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from every_tensor(v, where + (k,))
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from every_tensor(v, where + (i,))


@pytest.fixture(scope="module")
def coupled():
    torch.manual_seed(0)
    return EdgeGraph.build(load_spec(COUPLED), "cpu")


def batches(tiny_graph, coupled, questions):
    """A multiple-choice batch with cached states of every kind, and an lm batch (offsets, a causal index each
    way); the states are stand-ins: only their keys decide where they go."""
    choice = tiny_graph.collate(questions[:5])
    width = 8
    states = {"prefix:gemma2:2": torch.randn(5, 7, width), "mean:qwen2:1": torch.randn(5, width),
              "token:llama:1": torch.randn(5, 9, width)}
    texts = ["The acid broke down the substances.", "Héllo, wörld 42!"]
    return [(tiny_graph, choice, states), (coupled, coupled.collate_text(texts, ["a", "b"]), None)]


@pytest.mark.parametrize("case", [0, 1], ids=["choice", "lm"])
@pytest.mark.parametrize("on_meta", ["every node", "one node"])
def test_every_tensor_of_a_micro_batch_reaches_its_device_in_one_copy(tiny_graph, coupled, questions,
                                                                      monkeypatch, case, on_meta):
    graph, batch, states = batches(tiny_graph, coupled, questions)[case]
    names = list(graph.nodes) if on_meta == "every node" else list(graph.nodes)[-1:]
    for name in names:
        monkeypatch.setattr(graph.nodes[name], "device", META)
    where = transfer.destinations(graph, batch, states)
    # every tensor the batch holds has a destination (nothing reaches the step by another way)
    held = {id(t) for _, t in every_tensor(batch)} | {id(t) for t in (states or {}).values()}
    assert held == {id(t) for t, _ in where.values()}
    with Copies() as copies:
        packed = transfer.pack(graph, batch, states)
    assert copies.moves == []               # packing stays on the host
    # the packed bytes are the tensors, bit for bit, each at an aligned offset, none overlapping
    spans = []
    for place, slot in packed.slots.items():
        device, offset, dtype, shape = slot
        original = where[place][0]
        assert device == where[place][1] == META and offset % transfer.ALIGN == 0
        assert torch.equal(transfer._view(packed.buffers[device], slot), original)
        spans.append((offset, offset + original.numel() * original.element_size()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    with Copies() as copies:
        arrived, arrived_states = transfer.arrive(packed)
    assert len(copies.moves) == len(packed.buffers) == 1      # one copy per device, from page-locked memory
    moved = {where[p][1] for p in packed.slots}
    assert moved == {META}
    placed = dict(transfer.destinations(graph, arrived, arrived_states))
    for place, (tensor, device) in placed.items():
        assert tensor.device == device, place
        original = where[place][0]
        assert (tensor.dtype, tensor.shape) == (original.dtype, original.shape)
        if device != META:
            assert tensor is original, f"{place} stays where it is used, uncopied"
    assert arrived.ids == batch.ids
    expected = {(n, i) for n in names for i in (0, 1)}
    assert {p[1:] for p in packed.slots if p[0] == "tokens"} == expected


def test_on_the_cpu_nothing_is_packed_or_copied(tiny_graph, coupled, questions):
    for graph, batch, states in batches(tiny_graph, coupled, questions):
        packed = transfer.pack(graph, batch, states)
        assert packed.buffers == {} and packed.slots == {}
        with Copies() as copies:
            arrived, arrived_states = transfer.arrive(packed)
        assert copies.moves == []
        assert all(a is b for (_, a), (_, b) in zip(every_tensor(arrived), every_tensor(batch)))
        assert arrived_states == states


def test_ahead_makes_each_input_once_in_order_on_another_thread():
    import threading

    main = threading.get_ident()
    made = []

    def make(x):
        made.append((x, threading.get_ident() != main))
        return x * 10

    assert list(transfer.ahead(make, range(5))) == [0, 10, 20, 30, 40]
    assert [x for x, _ in made] == [0, 1, 2, 3, 4] and all(other for _, other in made)
    assert list(transfer.ahead(make, [])) == []
    assert list(transfer.ahead(lambda x: x, [None, 0, None])) == [None, 0, None]     # None is an input too


class Handed(Exception):
    """Raised where the nodes would compute (on the meta device they cannot): what they were handed is kept."""


@pytest.mark.parametrize("variant", ["coupled", "alone"])
@pytest.mark.parametrize("path", ["score", "generate"])
def test_scoring_and_generation_hand_the_nodes_only_what_crossed_in_one_copy(coupled, monkeypatch, path, variant):
    from lowmem_graph.generate import generate
    from lowmem_graph.lm_choices import Item, score
    from lowmem_graph.nodes import FrozenNode

    for node in coupled.nodes.values():
        monkeypatch.setattr(node, "device", META)
    handed = []

    def graph_forward(self, batch, cached=None):
        handed.extend(transfer.destinations(self, batch).items())
        raise Handed

    def node_final(self, input_ids, attention_mask, masks=None):
        handed.extend(((self.spec.name, i), (t, self.device)) for i, t in
                      enumerate([input_ids, attention_mask, *(masks or {}).values()]) if t is not None)
        raise Handed

    monkeypatch.setattr(EdgeGraph, "forward", graph_forward)
    monkeypatch.setattr(FrozenNode, "final", node_final)
    with Copies() as copies, pytest.raises(Handed):
        if path == "score":
            items = [Item("q", "acc", "Plants take in", ("carbon dioxide.", "music."), (0,))]
            score(coupled, {variant: None}, items, batch_size=2, progress=False)
        else:
            generate(coupled, "Plants take in", variant=variant, max_new_tokens=2)
    assert handed and all(tensor.device == device for _, (tensor, device) in handed)
    assert {device for _, (_, device) in handed} >= {META}
    assert [(device, blocking) for _, device, blocking in copies.moves] == [(META, True)]   # arrive's one copy
