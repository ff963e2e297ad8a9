"""Checkpointed layer groups and layer streaming: same numbers as the plain model, within the device budget."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
from frozen_run import prefix_of, run_node
from deferred_copies import DeferredCopies

from lowmem_graph.memory import host, stream
from lowmem_graph.memory.checkpoint import GroupCheckpoint
from lowmem_graph.memory.estimate import FrozenPlacement, GroupPlan
from lowmem_graph.memory.placement import Placement, norm_and_rotary
from lowmem_graph.memory.stream import ALIGN, LayerStreamer
from lowmem_graph.nodes import FrozenNode
from lowmem_graph.spec import NodeSpec

TEXTS = ["Question: Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nAnswer:", "Short one."]


@pytest.fixture(scope="module")
def bf16_node():
    return FrozenNode.load(NodeSpec(name="m16", model="tiny:mistral", role="refiner"), "bf16", "cpu", 64)


@pytest.fixture(scope="module")
def int8_node():
    """LLM.int8 (bitsandbytes Linear8bitLt): its forward reads state.CB and rebinds weight.data to it."""
    return FrozenNode.load(NodeSpec(name="q8", model="tiny:qwen2", role="refiner"), "int8", "cpu", 64)


def _trainables(node, seed=0, device="cpu"):
    """A learned vector and projection that enter below every decoder layer (on layer 0's input)."""
    g = torch.Generator().manual_seed(seed)
    delta = (0.1 * torch.randn(node.width, generator=g)).to(device).requires_grad_()
    proj = (0.05 * torch.randn(node.width, node.width, generator=g)).to(device).requires_grad_()
    return delta, proj


def _step(node, delta, proj, around_forward=contextlib.nullcontext):
    """Final hidden states and the trainables' grads for one forward (run inside `around_forward()`) + backward."""
    enc = node.encode(TEXTS)

    def enter(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = h + delta.to(h.dtype) + h @ proj.to(h.dtype)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = node.layers[0].register_forward_pre_hook(enter, with_kwargs=True)
    try:
        with around_forward():
            out = run_node(node, enc["input_ids"], enc["attention_mask"])
    finally:
        handle.remove()
    delta.grad = proj.grad = None
    out.float().square().mean().backward()
    return out.detach(), delta.grad.clone(), proj.grad.clone()


def _saved_bytes(node, trainables):
    """`_step`, and the bytes its forward gives autograd to keep for backward (what checkpointing is meant to cut;
    a checkpointed group's recompute saves what its backward needs only while that runs)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.nbytes
        return t

    step = _step(node, *trainables, lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
    return step, total


@pytest.mark.parametrize("name", ["phi3", "mistral"])
@pytest.mark.parametrize("groups", [[[0, 1], [2, 3]], [[0], [1, 2], [3]]])
def test_checkpointed_groups_give_the_plain_gradients_through_4bit_layers(tiny_nodes, name, groups):
    node = tiny_nodes[name]
    trainables = _trainables(node)
    plain, plain_saved = _saved_bytes(node, trainables)
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
             for i, layer in enumerate(node.layers)]
    try:
        with GroupCheckpoint(node.layers, groups):
            ckpt, ckpt_saved = _saved_bytes(node, trainables)
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
        return run_node(node, enc["input_ids"], enc["attention_mask"], inject=lambda h: h + a)

    plain = torch.autograd.grad(run().square().sum(), a)[0]
    with GroupCheckpoint(node.layers, [[0, 1, 2], [3]]):
        assert torch.equal(torch.autograd.grad(run().square().sum(), a)[0], plain)
    with GroupCheckpoint(node.layers, [[2, 3]]), pytest.raises(RuntimeError, match="start a group at layer 3"):
        run()


def _place_top(node, device="cuda"):
    """What placing a refiner's upper layers moves besides them: its final norm and rotary tables."""
    for part in norm_and_rotary(node):
        part.to(device)
    node.device = torch.device(device)


def _in(t, buffers):
    return any(b.data_ptr() <= t.data_ptr() < b.data_ptr() + b.numel() for b in buffers)


def _weights(layer):
    """Every tensor a layer reads: parameters and, for 4-bit ones, their (nested) quant state."""
    for module in layer.modules():
        if hasattr(module, "init_8bit_state"):
            yield from (module.state.CB, module.state.SCB)
        for p in module.parameters(recurse=False):
            yield p
            state = getattr(p, "quant_state", None)
            if state is not None:
                yield from (state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code)


def _group_bytes(node, group, align=1):
    distinct = {(t.data_ptr(), t.nbytes): t for i in group for t in _weights(node.layers[i])}   # int8: weight is CB
    return sum(-(-t.nbytes // align) * align for t in distinct.values())


@pytest.mark.parametrize("name, groups, resident", [
    ("phi3", [[0], [1], [2], [3]], {1}),
    ("mistral", [[0, 1], [2], [3]], set()),
    ("bf16", [[0], [1], [2], [3]], {3}),
    ("int8", [[0], [1], [2], [3]], {0}),
])
def test_streamed_node_matches_the_plain_one_within_its_budget(request, tiny_nodes, name, groups, resident):
    node = request.getfixturevalue(f"{name}_node") if name in ("bf16", "int8") else tiny_nodes[name]
    enc = node.encode(TEXTS)
    before = {k: v.clone() for k, v in node.frozen_tensors()}
    params = [id(p) for p in node.model.parameters()]
    trainables = _trainables(node)
    plain = _step(node, *trainables)
    with torch.no_grad():
        plain_eval = run_node(node, enc["input_ids"], enc["attention_mask"])

    streamed = [group for g, group in enumerate(groups) if g not in resident]
    streamed_layers = [i for group in streamed for i in group]
    seen = {}
    with LayerStreamer(node.layers, groups, resident, device="cpu") as streamer:
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
                assert torch.equal(run_node(node, enc["input_ids"], enc["attention_mask"]), plain_eval)
        finally:
            for h in hooks:
                h.remove()
        # 3 groups through 2 slots: forward loads all, backward reloads the first; later steps 2 loads each,
        # the eval forward 1, and it ends by prefetching group 0 for a next pass into the free slot (an odd count
        # swaps the slots). Only the very first group was not prefetched: prefetch follows the direction.
        assert streamer.loads == 4 + 2 + 2 + 1 + 1 and streamer.misses == 1
        assert max(_group_bytes(node, g) for g in streamed) <= streamer.slot_bytes \
            <= max(_group_bytes(node, g, ALIGN) for g in streamed)
        assert sum(_group_bytes(node, g) for g in streamed) <= streamer.slab.numel() \
            <= sum(_group_bytes(node, g, ALIGN) for g in streamed)       # exact size, no power-of-two rounding
        assert streamer.peak_device_bytes == streamer.device_bytes == streamer.resident_bytes + 2 * streamer.slot_bytes

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
        out = run_node(node, enc["input_ids"], enc["attention_mask"], inject=lambda h: h + delta)
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
        plain = run_node(node, enc["input_ids"], enc["attention_mask"])
        with LayerStreamer(node.layers, [[0], [1], [2], [3]], device="cpu") as streamer:
            for _ in range(3):
                assert torch.equal(run_node(node, enc["input_ids"], enc["attention_mask"]), plain)
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


@pytest.mark.parametrize("name", ["phi3", "mistral"])
def test_copies_that_land_only_when_waited_for_give_the_plain_numbers(tiny_nodes, monkeypatch, name):
    """The CUDA branch's ordering, on the CPU (tests/deferred_copies.py): every group waits for its own copy,
    through training and evaluation passes in any order. Three streamed groups in two slots: a pass without grad
    swaps the slots' pairing, and the training passes after it must still find each group where its copy went."""
    node = tiny_nodes[name]
    enc = node.encode(TEXTS)
    trainables = _trainables(node)
    plain = _step(node, *trainables)
    with torch.no_grad():
        plain_eval = run_node(node, enc["input_ids"], enc["attention_mask"])
    streamer = DeferredCopies().install(monkeypatch)
    with streamer(node.layers, [[0], [1], [2], [3]], {1}, device="cpu") as s:
        for phase in "TETEETT":
            if phase == "T":
                for a, b in zip(plain, _step(node, *trainables)):
                    assert torch.equal(a, b)
            else:
                with torch.no_grad():
                    assert torch.equal(run_node(node, enc["input_ids"], enc["attention_mask"]), plain_eval)
        assert s.loads > 0


def test_the_deferred_copy_model_catches_a_missing_wait(tiny_nodes, monkeypatch):
    node = tiny_nodes["phi3"]
    trainables = _trainables(node)
    plain = _step(node, *trainables)
    model = DeferredCopies()
    streamer = model.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(wait_event=lambda e: None))
    with streamer(node.layers, [[0], [1], [2], [3]], {1}, device="cpu"):
        got = _step(node, *trainables)
    assert not all(torch.equal(a, b) for a, b in zip(plain, got))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_on_cuda_a_hosted_node_visits_and_streams_like_a_resident_one(quant):
    """The CUDA paths the CPU tests cannot take: `.to()` of quantised layers (visiting), the page-locked slab, the
    side stream and its events. A node kept in host memory must compute what the same node resident on the GPU
    does."""
    spec = NodeSpec(name="m", model="tiny:mistral", role="refiner")
    resident = FrozenNode.load(spec, quant, "cuda", 64)
    hosted = FrozenNode.load(spec, quant, "cpu", 64, compute_device="cuda")
    enc = resident.encode(TEXTS)
    with Placement("cuda").frozen_pass(hosted):
        assert hosted.layers[0].self_attn.q_proj.weight.is_cuda
        torch.testing.assert_close(prefix_of(hosted, **enc), prefix_of(resident, **enc))
    assert not hosted.layers[0].self_attn.q_proj.weight.is_cuda        # back on the host after the visit
    placement = FrozenPlacement([GroupPlan("m", i, i + 1, 0, resident=i == 0) for i in range(hosted.inject_layer)],
                                2, {})
    plan = SimpleNamespace(frozen={"m": placement})
    with Placement("cuda", plan).frozen_pass(hosted) as streamer:      # a frozen pass under a small budget
        for _ in range(2):
            torch.testing.assert_close(prefix_of(hosted, **enc), prefix_of(resident, **enc))
        assert streamer.slab.is_pinned() and streamer.loads == 2

    trainables = _trainables(resident, device="cuda")       # both nodes run the same CUDA ops on them
    plain = _step(resident, *trainables)
    _place_top(hosted)
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


class FakeDriver:
    """cudaHostRegister's rules on the CPU: whole pages are locked, a page can be registered once, and
    unregistering takes the pointer that was registered."""

    ALREADY, NOT_REGISTERED = 712, 713

    def __init__(self, fail_at: int | None = None, error: int = 1):
        self.ranges, self.calls, self.fail_at, self.error = {}, 0, fail_at, error

    def register(self, ptr, nbytes):
        self.calls += 1
        if self.calls == self.fail_at:
            return self.error                           # default: cudaErrorInvalidValue, a fault
        first, last = ptr // host.PAGE, (ptr + nbytes - 1) // host.PAGE
        if any(first <= b and a <= last for a, b in self.ranges.values()):
            return self.ALREADY
        self.ranges[ptr] = (first, last)
        return 0

    def unregister(self, ptr):
        return 0 if self.ranges.pop(ptr, None) else self.NOT_REGISTERED


@pytest.fixture
def driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(host, "host_register", fake.register)
    monkeypatch.setattr(host, "host_unregister", fake.unregister)
    return fake


def _snapshot(nodes):
    """Every tensor a node's layers read: where it is, and its bytes."""
    return {(name, i, k): (t.data_ptr(), t.device, t.clone())
            for name, node in nodes.items() for i, layer in enumerate(node.layers)
            for k, t in enumerate(_weights(layer))}


def _assert_as_before(nodes, before):
    after = _snapshot(nodes)
    assert after.keys() == before.keys()
    for key, (ptr, device, value) in before.items():
        assert after[key][0] == ptr and after[key][1] == device and torch.equal(after[key][2], value), key
    assert not any("forward" in vars(layer) for node in nodes.values() for layer in node.layers)


@pytest.mark.parametrize("names", [("phi3", "mistral"), ("phi3", "mistral", "llama")])
def test_streamers_alive_together_have_page_aligned_disjoint_slabs(tiny_nodes, driver, names):
    streamers = [LayerStreamer(tiny_nodes[n].layers, [[0], [1], [2], [3]], {0}, device="cpu", pin=True)
                 for n in names]
    try:
        spans = []
        for s in streamers:
            start = s.slab.data_ptr()
            assert start % host.PAGE == 0 and s.host.mapped % host.PAGE == 0
            assert s.host.mapped >= s.slab.numel() > 0 and s.host.pinned
            spans.append((start, start + s.host.mapped))
        spans.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        assert len(driver.ranges) == len(names)         # every slab page-locked, none refused as "already"
    finally:
        for s in streamers:
            s.detach()
    assert driver.ranges == {} and not any(s.host.pinned for s in streamers)


def test_a_refused_registration_leaves_every_layer_as_it_was(tiny_nodes, monkeypatch):
    fake = FakeDriver(fail_at=1)
    monkeypatch.setattr(host, "host_register", fake.register)
    monkeypatch.setattr(host, "host_unregister", fake.unregister)
    nodes = {n: tiny_nodes[n] for n in ("phi3", "mistral")}
    before = _snapshot(nodes)
    with pytest.raises(RuntimeError, match="cudaHostRegister failed"):
        LayerStreamer(nodes["phi3"].layers, [[0], [1], [2], [3]], {1}, device="cpu", pin=True)
    _assert_as_before(nodes, before)
    assert fake.ranges == {}


def test_when_a_later_refiner_fails_the_earlier_ones_let_go(tiny_graph, monkeypatch):
    """Placement.start_steps builds one streamer per refiner: the second one's registration fails, so the first is
    detached and unregistered, and no layer of either keeps a slab view or a replaced forward."""
    from lowmem_graph.memory.estimate import Plan

    fake = FakeDriver(fail_at=2)
    monkeypatch.setattr(host, "host_register", fake.register)
    monkeypatch.setattr(host, "host_unregister", fake.unregister)
    real = stream.LayerStreamer
    made = []
    monkeypatch.setattr(stream, "LayerStreamer", lambda *a, **k: made.append(real(*a, **k, pin=True)) or made[-1])
    groups = [GroupPlan(name, i, i + 1, 0, resident=False) for name in tiny_graph.refiners
              for i in range(tiny_graph.nodes[name].inject_layer, 4)]
    plan = Plan(1 << 30, 8, 64, 8, 2, groups, {}, 0, 0, 0)
    nodes = {n: tiny_graph.nodes[n] for n in tiny_graph.refiners}
    before = _snapshot(nodes)
    with pytest.raises(RuntimeError, match="cudaHostRegister failed"):
        Placement("cpu", plan).start_steps(tiny_graph)
    assert len(made) == 1 and not made[0].host.pinned and made[0].slots == []
    assert fake.ranges == {} and fake.calls == 2
    # the first refiner's streamed tensors are views into its (unpinned) slab now; values and devices unchanged
    for key, (_, device, value) in before.items():
        t = _snapshot(nodes)[key]
        assert t[1] == device and torch.equal(t[2], value), key
    assert not any("forward" in vars(layer) for node in nodes.values() for layer in node.layers)


@pytest.mark.parametrize("error", sorted(host.PAGEABLE_FALLBACK))
def test_a_machine_that_will_not_lock_the_slab_streams_from_pageable_memory(tiny_nodes, monkeypatch, error):
    """WSL 2 and memlock quotas refuse large registrations: the run warns, clears CUDA's last error (torch would
    raise it at the next kernel launch) and streams the same numbers from an unlocked slab."""
    fake = FakeDriver(fail_at=1, error=error)
    monkeypatch.setattr(host, "host_register", fake.register)
    monkeypatch.setattr(host, "host_unregister", fake.unregister)
    cleared = []
    monkeypatch.setattr(host, "clear_cuda_error", lambda: cleared.append(True))
    node = tiny_nodes["phi3"]
    trainables = _trainables(node)
    plain = _step(node, *trainables)
    with pytest.warns(RuntimeWarning, match=f"could not page-lock.*{host.PAGEABLE_FALLBACK[error]}"):
        streamer = LayerStreamer(node.layers, [[0], [1], [2], [3]], {0}, device="cpu", pin=True)
    with streamer:
        assert not streamer.host.pinned and cleared == [True]
        for a, b in zip(plain, _step(node, *trainables)):
            assert torch.equal(a, b)
    assert fake.ranges == {} and fake.calls == 1        # nothing registered, nothing to unregister


def test_a_machine_out_of_pinned_memory_keeps_rows_and_activations_pageable(monkeypatch):
    """torch's pinned allocator raises where the machine will lock no more (WSL 2): the cached rows and the
    layer-major-host schedule's kept tensors go to pageable memory, with one warning, and pinning is not retried."""
    from lowmem_graph.memory.kept import Kept

    monkeypatch.setattr(host, "_pinning_refused", False)
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    t = torch.arange(6.0).view(2, 3)
    with pytest.warns(RuntimeWarning, match=r"could not page-lock more host memory \(CUDA error: out of memory\)"):
        assert host.page_locked(t) is t
    assert host.page_locked(t) is t and len(calls) == 1
    kept = Kept("cuda", on_host=True).keep(t)       # the tensor is on the CPU here: only the host side runs
    assert torch.equal(kept, t) and kept.data_ptr() != t.data_ptr() and not kept.is_pinned()


def test_the_cuda_runtime_is_found_in_the_process_map():
    maps = ("7f00-7f10 r-xp 00000000 08:01 123  /venv/nvidia/cu13/lib/libcudart.so.13\n"
            "7f10-7f20 r--p 00010000 08:01 123  /venv/nvidia/cu13/lib/libcudart.so.13\n"
            "7f20-7f30 r-xp 00000000 08:01 124  /venv/torch/lib/libtorch_cuda.so\n"
            "7f30-7f40 rw-p 00000000 00:00 0 \n"
            "7f40-7f50 r-xp 00000000 08:01 125  /opt/my dir/libcudart.so.12\n")
    assert host.cudart_libraries(maps) == ["/venv/nvidia/cu13/lib/libcudart.so.13", "/opt/my dir/libcudart.so.12"]
    host.clear_cuda_error()       # no runtime in this process: nothing to do, no error


def test_a_pinned_slab_collected_without_unpin_unpins_first(driver):
    import gc

    slab = host.HostSlab(10_000)
    slab.pin()
    assert len(driver.ranges) == 1 and slab.mapped == -(-10_000 // host.PAGE) * host.PAGE
    del slab
    gc.collect()
    assert driver.ranges == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_refused_registration_is_cleared_before_the_next_kernel():
    """A refused cudaHostRegister stays the runtime's last error (torch's binding only returns it); without
    clear_cuda_error torch's launch check would raise it at the next kernel."""
    import ctypes

    slab = host.HostSlab(1 << 20)
    slab.pin()
    try:
        assert host.host_register(slab.tensor.data_ptr(), slab.mapped) == FakeDriver.ALREADY
        with open("/proc/self/maps") as f:
            runtimes = [ctypes.CDLL(p) for p in host.cudart_libraries(f.read())]
        assert runtimes and any(r.cudaPeekAtLastError() == FakeDriver.ALREADY for r in runtimes)
        host.clear_cuda_error()
        assert all(r.cudaPeekAtLastError() == 0 for r in runtimes)
        assert (torch.ones(8, device="cuda") * 2).sum().item() == 16
    finally:
        slab.unpin()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_two_refiners_stream_at_once():
    """Two streamers alive together, as in every --gpu-mem run: both slabs page-locked (the second registration
    must not collide with the first), both nodes compute what they compute resident, with no sticky CUDA error."""
    specs = [NodeSpec(name=n, model=f"tiny:{n}", role="refiner") for n in ("phi3", "mistral")]
    resident = [FrozenNode.load(s, "nf4", "cuda", 64) for s in specs]
    hosted = [FrozenNode.load(s, "nf4", "cpu", 64, compute_device="cuda") for s in specs]
    plain = []
    for node in resident:
        trainables = _trainables(node, device="cuda")
        plain.append((trainables, _step(node, *trainables)))
    for node in hosted:
        _place_top(node)
    streamers = [LayerStreamer(node.layers, [[0], [1], [2], [3]], device="cuda") for node in hosted]
    try:
        for s in streamers:
            assert s.slab.is_pinned() and s.slab.data_ptr() % host.PAGE == 0
        a, b = sorted((s.slab.data_ptr(), s.slab.data_ptr() + s.host.mapped) for s in streamers)
        assert a[1] <= b[0]
        for _ in range(2):
            for node, (trainables, expected) in zip(hosted, plain):
                for x, y in zip(expected, _step(node, *trainables)):
                    torch.testing.assert_close(y.float(), x.float(), rtol=1e-2, atol=1e-3 * x.abs().max().item())
        torch.cuda.synchronize()
    finally:
        for s in streamers:
            s.detach()
    assert not any(s.host.pinned for s in streamers)
    torch.cuda.synchronize()        # a sticky error from a bad registration would surface here
