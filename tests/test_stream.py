"""Checkpointed layer groups and layer streaming: same numbers as the plain model, within the device budget."""
import pytest
import torch

from lowmem_graph.errors import UserError
from lowmem_graph.memory.checkpoint import GroupCheckpoint
from lowmem_graph.memory.plan import FrozenPlacement, GroupPlan
from lowmem_graph.memory.stream import ALIGN, LayerStreamer
from lowmem_graph.nodes import FrozenNode
from lowmem_graph.spec import NodeSpec

TEXTS = ["Question: Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nAnswer:", "Short one."]


@pytest.fixture(scope="module")
def bf16_node():
    return FrozenNode.load(NodeSpec(name="m16", model="tiny:mistral", role="refiner"), "bf16", "cpu", 64)


def _trainables(node, seed=0, device="cpu"):
    """A learned vector and projection that enter below every decoder layer (on layer 0's input)."""
    g = torch.Generator().manual_seed(seed)
    delta = (0.1 * torch.randn(node.width, generator=g)).to(device).requires_grad_()
    proj = (0.05 * torch.randn(node.width, node.width, generator=g)).to(device).requires_grad_()
    return delta, proj


def _step(node, delta, proj):
    """Final hidden states and the trainables' grads for one forward + backward."""
    enc = node.encode(TEXTS)

    def enter(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = h + delta.to(h.dtype) + h @ proj.to(h.dtype)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = node.layers[0].register_forward_pre_hook(enter, with_kwargs=True)
    try:
        out = node.run(enc["input_ids"], enc["attention_mask"])
    finally:
        handle.remove()
    delta.grad = proj.grad = None
    out.float().square().mean().backward()
    return out.detach(), delta.grad.clone(), proj.grad.clone()


def _saved_bytes(fn):
    """Bytes autograd keeps for backward while `fn` runs (what checkpointing is meant to cut)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), total


@pytest.mark.parametrize("name", ["phi3", "mistral"])
@pytest.mark.parametrize("groups", [[[0, 1], [2, 3]], [[0], [1, 2], [3]]])
def test_checkpointed_groups_give_the_plain_gradients_through_4bit_layers(tiny_nodes, name, groups):
    node = tiny_nodes[name]
    trainables = _trainables(node)
    plain, plain_saved = _saved_bytes(lambda: _step(node, *trainables))
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
             for i, layer in enumerate(node.layers)]
    try:
        with GroupCheckpoint(node.layers, groups):
            ckpt, ckpt_saved = _saved_bytes(lambda: _step(node, *trainables))
    finally:
        for h in hooks:
            h.remove()
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in node.model.parameters())
    assert ckpt_saved < plain_saved / 2              # groups kept their inputs only ...
    assert sorted(calls) == sorted(2 * list(range(4)))   # ... and were recomputed in backward
    assert not any("forward" in vars(layer) for layer in node.layers)


def test_trainable_input_must_start_a_group(tiny_nodes):
    node = tiny_nodes["phi3"]                        # injection at layer 3
    enc = node.encode(TEXTS)
    a = torch.zeros(node.width, requires_grad=True)

    def run():
        return node.run(enc["input_ids"], enc["attention_mask"], inject=lambda h: h + a)

    plain = torch.autograd.grad(run().square().sum(), a)[0]
    with GroupCheckpoint(node.layers, [[0, 1, 2], [3]]):
        assert torch.equal(torch.autograd.grad(run().square().sum(), a)[0], plain)
    with GroupCheckpoint(node.layers, [[2, 3]]), pytest.raises(RuntimeError, match="start a group at layer 3"):
        run()


def _in(t, buffers):
    return any(b.data_ptr() <= t.data_ptr() < b.data_ptr() + b.numel() for b in buffers)


def _weights(layer):
    """Every tensor a layer reads: parameters and, for 4-bit ones, their (nested) quant state."""
    for module in layer.modules():
        for p in module.parameters(recurse=False):
            yield p
            state = getattr(p, "quant_state", None)
            if state is not None:
                yield from (state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code)


def _group_bytes(node, group, align=1):
    return sum(-(-t.nbytes // align) * align for i in group for t in _weights(node.layers[i]))


@pytest.mark.parametrize("name, groups, resident", [
    ("phi3", [[0], [1], [2], [3]], {1}),
    ("mistral", [[0, 1], [2], [3]], set()),
    ("bf16", [[0], [1], [2], [3]], {3}),
])
def test_streamed_node_matches_the_plain_one_within_its_budget(request, tiny_nodes, name, groups, resident):
    node = request.getfixturevalue("bf16_node") if name == "bf16" else tiny_nodes[name]
    enc = node.encode(TEXTS)
    before = {k: v.clone() for k, v in node.frozen_tensors()}
    params = [id(p) for p in node.model.parameters()]
    trainables = _trainables(node)
    plain = _step(node, *trainables)
    with torch.no_grad():
        plain_eval = node.run(enc["input_ids"], enc["attention_mask"])

    streamed = [group for g, group in enumerate(groups) if g not in resident]
    streamed_layers = [i for group in streamed for i in group]
    budget = 10 * _group_bytes(node, streamed[0], ALIGN)
    seen = {}
    with LayerStreamer(node.layers, groups, resident, device="cpu", budget_bytes=budget) as streamer:
        def check(module, args, i):
            # a streamed layer computes from its slot; a resident one from its own tensors, never the slab
            where = streamer.slots if i in streamed_layers else [streamer.slab] + streamer.slots
            inside = [_in(t, where) for t in _weights(node.layers[i])]
            seen.setdefault(i, []).append(all(inside) if i in streamed_layers else not any(inside))

        hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: check(m, a, i))
                 for i, layer in enumerate(node.layers)]
        try:
            for _ in range(3):
                for a, b in zip(plain, _step(node, *trainables)):
                    assert torch.equal(a, b)
            with torch.no_grad():
                assert torch.equal(node.run(enc["input_ids"], enc["attention_mask"]), plain_eval)
        finally:
            for h in hooks:
                h.remove()
        # 3 groups through 2 slots: forward loads all, backward reloads the first; later steps 2 loads each,
        # the eval forward 1. Only the very first group was not prefetched: prefetch follows the direction.
        assert streamer.loads == 4 + 2 + 2 + 1 and streamer.misses == 1
        assert max(_group_bytes(node, g) for g in streamed) <= streamer.slot_bytes \
            <= max(_group_bytes(node, g, ALIGN) for g in streamed)
        assert sum(_group_bytes(node, g) for g in streamed) <= streamer.slab.numel() \
            <= sum(_group_bytes(node, g, ALIGN) for g in streamed)       # exact size, no power-of-two rounding
        assert streamer.peak_device_bytes == streamer.device_bytes == streamer.resident_bytes + 2 * streamer.slot_bytes
        assert streamer.device_bytes <= budget

    assert seen == {i: [True] * 7 for i in range(4)}     # 3 x (forward + recompute) + 1 eval, every layer
    assert all(p.grad is None for p in node.model.parameters())
    assert streamer.device_bytes == 0 and not any("forward" in vars(layer) for layer in node.layers)
    assert [id(p) for p in node.model.parameters()] == params
    for k, v in node.frozen_tensors():
        assert torch.equal(v, before[k]), k
    for a, b in zip(plain, _step(node, *trainables)):
        assert torch.equal(a, b)


def test_streamed_refiner_steered_at_its_injection_layer(tiny_nodes):
    node = tiny_nodes["mistral"]                     # injection at layer 3: layers below run without grad
    enc = node.encode(TEXTS)
    delta = torch.full((node.width,), 0.1, requires_grad=True)

    def step():
        out = node.run(enc["input_ids"], enc["attention_mask"], inject=lambda h: h + delta)
        return out.detach(), torch.autograd.grad(out.square().sum(), delta)[0]

    plain = step()
    with LayerStreamer(node.layers, [[0], [1], [2], [3]], device="cpu") as streamer:
        for _ in range(2):
            for a, b in zip(plain, step()):
                assert torch.equal(a, b)
    assert streamer.loads == 2 * 4 and streamer.misses == 2     # each forward starts from the bottom again


def test_passes_without_grad_prefetch_the_next_pass_first_group(tiny_nodes):
    node = tiny_nodes["llama"]
    enc = node.encode(TEXTS)
    with torch.no_grad():
        plain = node.run(enc["input_ids"], enc["attention_mask"])
        with LayerStreamer(node.layers, [[0], [1], [2], [3]], device="cpu") as streamer:
            for _ in range(3):
                assert torch.equal(node.run(enc["input_ids"], enc["attention_mask"]), plain)
    # four groups, two slots: each pass ends by loading group 0 (slot 0, free: group 3 computes in slot 1)
    assert streamer.loads == 3 * 4 + 1 and streamer.misses == 1


def test_one_slot_streams_every_group_on_demand(tiny_nodes):
    node = tiny_nodes["phi3"]
    trainables = _trainables(node)
    plain = _step(node, *trainables)
    with LayerStreamer(node.layers, [[0], [1], [2], [3]], device="cpu", slots=1) as streamer:
        for _ in range(2):
            for a, b in zip(plain, _step(node, *trainables)):
                assert torch.equal(a, b)
        assert streamer.device_bytes == streamer.slot_bytes
    # each direction loads every group but the one the other direction left in the slot; nothing prefetched
    assert streamer.loads == streamer.misses == 4 + 3 + 3 + 3


def test_a_budget_below_resident_plus_two_slots_is_refused(tiny_nodes):
    node = tiny_nodes["mistral"]
    with LayerStreamer(node.layers, [[0], [1], [2], [3]], {0}, device="cpu") as streamer:
        need = streamer.device_bytes
    with pytest.raises(UserError, match="over the budget"):
        LayerStreamer(node.layers, [[0], [1], [2], [3]], {0}, device="cpu", budget_bytes=need - 1)
    assert not any("forward" in vars(layer) for layer in node.layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_hosted_node_visits_and_streams_like_a_resident_one():
    """The CUDA paths the CPU tests cannot take: `.to()` of 4-bit layers (visiting), the page-locked slab, the side
    stream and its events. A node kept in host memory must compute what the same node resident on the GPU does."""
    spec = NodeSpec(name="m", model="tiny:mistral", role="refiner")
    resident = FrozenNode.load(spec, "nf4", "cuda", 64)
    hosted = FrozenNode.load(spec, "nf4", "cpu", 64, compute_device="cuda")
    enc = resident.encode(TEXTS)
    with hosted.visiting("cuda"):
        assert hosted.layers[0].self_attn.q_proj.weight.is_cuda
        torch.testing.assert_close(hosted.prefix(**enc), resident.prefix(**enc))
    assert not hosted.layers[0].self_attn.q_proj.weight.is_cuda        # back on the host after the visit
    placement = FrozenPlacement([GroupPlan("m", i, i + 1, 0, resident=i == 0) for i in range(hosted.inject_layer)],
                                2, {})
    with hosted.visiting("cuda", placement) as streamer:               # a frozen pass under a small budget
        for _ in range(2):
            torch.testing.assert_close(hosted.prefix(**enc), resident.prefix(**enc))
        assert streamer.slab.is_pinned() and streamer.loads == 2

    trainables = _trainables(resident, device="cuda")       # both nodes run the same CUDA ops on them
    plain = _step(resident, *trainables)
    hosted.place_top("cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with LayerStreamer(hosted.layers, [[0], [1], [2], [3]], {3}, device="cuda") as streamer:
        assert streamer.slab.is_pinned()
        for _ in range(3):
            for a, b in zip(plain, _step(hosted, *trainables)):
                torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-3 * a.abs().max().item())
        torch.cuda.synchronize()
        assert streamer.misses == 1        # only the very first group: prefetch kept up in both directions
        held = torch.cuda.memory_allocated() - before
        assert held <= streamer.device_bytes + 2 ** 20                 # slots + the resident group, nothing more
    assert not hosted.layers[0].self_attn.q_proj.weight.is_cuda
