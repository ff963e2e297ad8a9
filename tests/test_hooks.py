"""One way to attach to a layer (lowmem_graph/hooks.py): hooks compose with each other and with torch's own, come
off in any order, and never replace a module's `forward`; recording, checkpointing and streaming all go through it."""
import pytest
import torch
from frozen_run import run_node

from lowmem_graph.hooks import LayerHook, StandIn, add_hook, hooks_of, remove_hook
from lowmem_graph.memory.checkpoint import GroupCheckpoint
from lowmem_graph.memory.stream import LayerStreamer

TEXTS = ["Question: Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nAnswer:", "Short one."]


class Toy(torch.nn.Module):
    def forward(self, hidden_states, scale=1.0):
        return hidden_states * 2 * scale


class Tagged(LayerHook):
    """Logs its events; adds `add` to the input on the way in."""

    def __init__(self, name, log, where="forward", add=0.0):
        self.name, self.log, self.where, self.add = name, log, where, add

    def pre_forward(self, module, *args, **kwargs):
        self.log.append(f"{self.name}<")
        return (args[0] + self.add, *args[1:]), kwargs

    def post_forward(self, module, output):
        self.log.append(f">{self.name}")
        return output


def test_hooks_compose_with_torch_hooks_and_come_off_in_any_order():
    toy, log = Toy(), []
    cls = type(toy)
    toy.register_forward_pre_hook(lambda m, a: log.append("torch-pre"))
    toy.register_forward_hook(lambda m, a, o: log.append("torch-post"))
    hooks = [Tagged("f1", log, add=1.0), Tagged("c1", log, "call", add=10.0), Tagged("f2", log, add=100.0)]
    handles = [add_hook(toy, h) for h in hooks]
    assert isinstance(toy, cls) and type(toy).__name__ == "Toy" and "forward" not in vars(toy)
    out = toy(torch.zeros(1), scale=0.5)
    # call hooks outside torch's, forward hooks inside; a later hook wraps an earlier one
    assert log == ["c1<", "torch-pre", "f2<", "f1<", ">f1", ">f2", "torch-post", ">c1"]
    assert out.item() == 111.0
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        handles = handles or [add_hook(toy, h) for h in hooks]
        for k in order:
            handles[k].remove()
            assert "forward" not in vars(toy)
            assert hooks_of(toy) == [h for j, h in enumerate(hooks) if j not in order[:order.index(k) + 1]]
            log.clear()
            kept = sum(h.add for h in hooks_of(toy))
            assert toy(torch.zeros(1)).item() == 2 * kept and log.count("torch-pre") == log.count("torch-post") == 1
        assert type(toy) is cls         # the last one off: the module's own class is back
        handles = []
    remove_hook(toy, hooks[0])          # not there: nothing happens


def test_a_stand_in_replaces_the_call_layer_and_torch_hooks_included():
    toy, log = Toy(), []
    toy.register_forward_pre_hook(lambda m, a, k: log.append("torch-pre"), with_kwargs=True)
    inner = add_hook(toy, Tagged("f", log))
    stand_in = add_hook(toy, StandIn(lambda module, hidden, args, kwargs: log.append((args, kwargs)) or hidden))
    x = torch.ones(2)
    assert toy(hidden_states=x, scale=3.0) is x and log == [((), {"scale": 3.0})]
    stand_in.remove()
    assert toy(x).tolist() == [2.0, 2.0] and log[1:] == ["torch-pre", "f<", ">f"]
    inner.remove()


def test_exclusive_hooks_and_a_forward_replaced_by_someone_else():
    class Once(LayerHook):
        exclusive = True

    toy = Toy()
    first = add_hook(toy, Once())
    with pytest.raises(RuntimeError, match="already has a Once"):
        add_hook(toy, Once())
    first.remove()
    # accelerate's hooks replace the instance's forward: ours on the forward would never run, so they are refused;
    # accelerate's on top of ours compose (its forward calls the class's, which runs ours)
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    log = []
    ours = add_hook(toy, Tagged("ours", log))

    class Theirs(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            log.append("theirs")
            return args, kwargs

    add_hook_to_module(toy, Theirs())
    with pytest.raises(RuntimeError, match="forward was replaced on the instance"):
        add_hook(toy, Tagged("late", log))
    assert toy(torch.ones(1)).item() == 2.0 and log == ["theirs", "ours<", ">ours"]
    remove_hook_from_module(toy)        # leaves its saved forward (ours, bound) on the instance
    ours.remove()
    log.clear()
    assert type(toy) is Toy and toy(torch.ones(1)).item() == 2.0 and log == []


def _no_forward_replaced(node, seen, phase):
    seen.append((phase, not any("forward" in vars(layer) for layer in node.layers)))


@pytest.mark.parametrize("kind", ["streamed", "checkpointed"])
def test_a_users_own_hooks_still_fire_while_streamed_checkpointed_and_recorded(tiny_nodes, kind):
    """A user's torch forward hook and pre-hook on every decoder layer, and a registry hook of theirs on one inside
    a group: each fires once per run of its layer, under a streamer's (or GroupCheckpoint's) groups as without;
    recording a node's layer calls runs the layers below the start (their hooks fire) and stands in for the others
    (not a run: their hooks do not fire). No phase replaces a layer's `forward`."""
    node = tiny_nodes["phi3"]
    enc = node.encode(TEXTS)
    delta = torch.full((node.width,), 0.05, requires_grad=True)
    pre, post, seen = [], [], []

    def enter(module, args, kwargs, i):
        pre.append(i)
        _no_forward_replaced(node, seen, "layer forward")
        if i == 0:      # the user's hook steers the stream entering layer 0: the group input then needs grad
            h = args[0] if args else kwargs["hidden_states"]
            h = h + delta.to(h.dtype)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: enter(m, a, k, i), with_kwargs=True)
               for i, layer in enumerate(node.layers)]
    handles += [layer.register_forward_hook(lambda m, a, o, i=i: post.append(i)) for i, layer in enumerate(node.layers)]
    handles.append(node.layers[1].mlp.register_forward_pre_hook(lambda m, a: _no_forward_replaced(node, seen, "mlp")))
    handles.append(node.norm.register_forward_pre_hook(lambda m, a: _no_forward_replaced(node, seen, "norm")))
    theirs = []

    class Theirs(LayerHook):
        def new_forward(self, module, inner, *args, **kwargs):
            theirs.append(torch.is_grad_enabled())
            return inner(*args, **kwargs)

    def step():
        pre.clear(), post.clear(), theirs.clear()
        out = run_node(node, enc["input_ids"], enc["attention_mask"], at=0)
        grad = torch.autograd.grad(out.float().square().mean(), delta)[0]
        return out.detach(), grad

    mine = add_hook(node.layers[1], Theirs())        # before the groups: inside their hook on layer 1
    try:
        plain = step()
        assert pre == post == [0, 1, 2, 3] and theirs == [True]
        groups = [[0], [1, 2], [3]]
        attach = (lambda: LayerStreamer(node.layers, groups, {0}, device="cpu")) if kind == "streamed" \
            else (lambda: GroupCheckpoint(node.layers, groups))
        with attach():
            for _ in range(2):
                got = step()
                assert all(torch.equal(a, b) for a, b in zip(plain, got))
                assert pre == post == [0, 1, 2, 3]              # once each, in the forward; not in recompute
                assert theirs == [False, True]      # inside the group: the forward (no graph kept), the recompute
            pre.clear(), post.clear()
            mark = len(seen)
            with torch.no_grad():
                node.layer_calls(enc["input_ids"], enc["attention_mask"], start=2)
            assert pre == post == [0, 1]                         # run: below the start; recorded: 2 and 3
            assert [p for p, _ in seen[mark:]] == ["layer forward", "layer forward", "mlp", "norm"]
    finally:
        mine.remove()
        for h in handles:
            h.remove()
    assert {p for p, _ in seen} >= {"layer forward", "mlp", "norm"} and all(ok for _, ok in seen)
    assert not any(hooks_of(layer) for layer in node.layers)
    assert not any("forward" in vars(layer) for layer in node.layers)
    assert all(type(layer).__name__ == type(node.layers[0]).__name__ for layer in node.layers)


def test_a_second_group_checkpoint_on_the_same_layers_is_refused_and_attaches_nothing(tiny_nodes):
    layers = tiny_nodes["llama"].layers
    with GroupCheckpoint(layers, [[1]]):
        with pytest.raises(RuntimeError, match=r"decoder layers \[1\] already run in a checkpointed group"):
            GroupCheckpoint(layers, [[0, 1], [2]])
        assert [len(hooks_of(layer)) for layer in layers] == [0, 1, 0, 0]
    assert not any(hooks_of(layer) for layer in layers)
