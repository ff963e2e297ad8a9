"""A node's attention masks made on the host at collation (masks.py) are the ones its model makes for itself: every
architecture, every layer's call and its output, bit for bit, padded (right, as nodes encode, and left) or not,
from the embeddings or from a cached prefix, with sliding windows shorter and longer than the text."""
import pytest
import torch
from frozen_run import prefix_of

from lowmem_graph.edge_graph import _run_layer
from lowmem_graph.masks import NO_MASK
from lowmem_graph.nodes import FrozenNode
from lowmem_graph.spec import NodeSpec
from lowmem_graph.tiny import ALL_ARCHS

TEXTS = ["Question: Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nAnswer:", "Short one.",
         "Plants take in carbon dioxide and give out oxygen."]
WINDOWED = ("qwen2", "gemma2", "phi3", "mistral")       # the models whose masks can be sliding windows


@pytest.fixture(scope="module")
def nodes(tiny_nodes):
    return {**tiny_nodes, "gpt2": FrozenNode.load(NodeSpec(name="gpt2", model="tiny:gpt2"), "nf4", "cpu", 64)}


def inputs(node, padding: str):
    enc = node.encode(TEXTS if padding != "none" else TEXTS[:1] * 2)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if padding == "left":           # each row's padding moved before its tokens
        ids = torch.stack([row.roll(int((m == 0).sum())) for row, m in zip(ids, mask)])
        mask = mask.flip(1)
    assert bool((mask == 0).any()) == (padding != "none")
    return ids, mask


def same(a, b) -> bool:
    """Equal bit for bit, through the tuples, lists and dicts of a layer call."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a is b or a == b


def run(node, h, calls):
    with node._autocast():
        for call in calls:
            h = _run_layer(call, h)
        return node.norm(h)


@pytest.mark.parametrize("window", ["as built", "short"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_masks_made_on_the_host_are_the_models_own(nodes, monkeypatch, arch, padding, window):
    node = nodes[arch]
    config = node.model.config
    if window == "short":
        if arch not in WINDOWED:
            pytest.skip("no sliding window")
        monkeypatch.setattr(config, "sliding_window", 4)
        if arch == "qwen2":         # every other layer sliding (use_sliding_window's pattern): a mask per layer type
            monkeypatch.setattr(config, "layer_types", ["full_attention", "sliding_attention"] * 2)
            monkeypatch.setattr(node.base, "has_sliding_layers", True)
    ids, mask = inputs(node, padding)
    masks = node.masks(mask)
    if config._attn_implementation != "sdpa":
        assert masks is None    # eager (Gemma-2: softcapping): its own masks, made without reading the mask
        return
    assert all(m is None or m.device.type == "cpu" for m in masks.values())
    # the value-dependent decision, made here: no mask for an unpadded batch unless a window cuts into it
    assert all(m is None for m in masks.values()) == (padding == "none" and window != "short")
    for start, prefix in [(0, None), (2, None), (2, prefix_of(node, ids, mask, at=2))]:
        h, calls = node.layer_calls(ids, mask, start=start, prefix=prefix)
        got_h, got = node.layer_calls(ids, mask, start=start, prefix=prefix, masks=masks)
        assert torch.equal(got_h, h) and len(got) == len(calls)
        for (layer, args, kwargs), (got_layer, got_args, got_kwargs) in zip(calls, got):
            assert got_layer is layer and same(got_args, args) and same(got_kwargs, kwargs)
            assert not any(a is NO_MASK for a in (*got_args, *got_kwargs.values()))
        assert torch.equal(run(node, got_h, got), run(node, h, calls))
    assert torch.equal(node.final(ids, mask, masks), node.final(ids, mask))
