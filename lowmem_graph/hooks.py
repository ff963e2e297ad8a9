"""One way to attach to a layer: a small hook registry, in the shape of accelerate's `ModelHook` and diffusers'
`HookRegistry`, that never replaces a module's `forward` attribute and never stops a forward by raising.

A `LayerHook` has `pre_forward` (may change the arguments), `new_forward` (calls `inner`, the rest of the chain, or
stands in for it) and `post_forward` (may change the output). It attaches at one of two places:

* "forward" (the default): around the module's forward, inside torch's own hooks on it: it sees the arguments
  after torch's forward pre-hooks, and torch's forward hooks see its output. Checkpointed layer groups (and the
  streamers built on them, memory/checkpoint.py) attach here, so anyone's torch hooks keep firing on every call.
* "call": around the whole call, outside torch's hooks: it sees what the caller passed and, by not calling
  `inner`, stands in for the call; then neither the module nor torch's hooks on it run (it was not run). Recording
  how a model's loop calls its layers (`FrozenNode.layer_calls`) attaches here.

Hooks compose: one registered later wraps those registered before it (as wrapping a function twice does), every
"call" hook outside every "forward" hook; any of them can be removed at any time, in any order. The first hook on
a module moves it into a subclass of its own class, made once per class, whose `__call__` and `forward` run the
hooks (as torch.nn.utils.parametrize and FSDP2's fully_shard do); removing the last one moves it back.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

_REGISTRY = "_lowmem_hooks"         # the instance attribute holding a module's HookRegistry
_SUBCLASSES: dict[type, type] = {}
WHERE = ("call", "forward")


class LayerHook:
    """Callbacks around a module's call or forward. `exclusive`: at most one hook of this class on a module."""

    where = "forward"
    exclusive = False

    def pre_forward(self, module, *args, **kwargs):
        return args, kwargs

    def new_forward(self, module, inner: Callable, *args, **kwargs):
        return inner(*args, **kwargs)

    def post_forward(self, module, output):
        return output


class StandIn(LayerHook):
    """Stands in for a layer's call: `respond(module, hidden, args, kwargs)` is its output, and the layer does not
    run. The hidden state is the first positional argument or `hidden_states=` (how transformers' loops call
    decoder layers); `args` and `kwargs` are the rest."""

    where = "call"

    def __init__(self, respond: Callable):
        self.respond = respond

    def new_forward(self, module, inner, *args, **kwargs):
        hidden, args, kwargs = split_hidden(args, kwargs)
        return self.respond(module, hidden, args, kwargs)


class HookHandle:
    def __init__(self, module: torch.nn.Module, hook: LayerHook):
        self.module, self.hook = module, hook

    def remove(self) -> None:
        remove_hook(self.module, self.hook)


class HookRegistry:
    """A module's hooks in registration order, and the class it had before the first one."""

    def __init__(self, module: torch.nn.Module):
        self.original = type(module)
        self.hooks: list[LayerHook] = []

    def chain(self, where: str) -> tuple[LayerHook, ...]:
        """The hooks at `where`, outermost first."""
        return tuple(h for h in reversed(self.hooks) if h.where == where)


def add_hook(module: torch.nn.Module, hook: LayerHook) -> HookHandle:
    """Attach `hook` to `module`; `.remove()` on the handle (or `remove_hook`) takes it off."""
    if hook.where not in WHERE:
        raise ValueError(f"a hook attaches at one of {WHERE}, not {hook.where!r}")
    if hook.where == "forward" and "forward" in vars(module):
        raise RuntimeError(f"{type(module).__name__}'s forward was replaced on the instance (another hook library?): "
                           "a hook on its class's forward would never run")
    registry = vars(module).get(_REGISTRY)
    if registry is not None and hook.exclusive and any(type(h) is type(hook) for h in registry.hooks):
        raise RuntimeError(f"{type(module).__name__} already has a {type(hook).__name__}")
    if registry is None:
        registry = HookRegistry(module)
        module.__dict__[_REGISTRY] = registry
        module.__class__ = _subclass(registry.original)
    registry.hooks.append(hook)
    return HookHandle(module, hook)


def remove_hook(module: torch.nn.Module, hook: LayerHook) -> None:
    """Take `hook` off `module` (nothing if it is not there); the last one gone, the module has its class back."""
    registry = vars(module).get(_REGISTRY)
    if registry is None or not any(h is hook for h in registry.hooks):
        return
    registry.hooks = [h for h in registry.hooks if h is not hook]
    if not registry.hooks:
        del module.__dict__[_REGISTRY]
        if type(module) is _SUBCLASSES.get(registry.original):     # not if someone subclassed it again since
            module.__class__ = registry.original


def hooks_of(module: torch.nn.Module) -> list[LayerHook]:
    registry = vars(module).get(_REGISTRY)
    return list(registry.hooks) if registry is not None else []


def split_hidden(args, kwargs):
    """(hidden state, other positional args, kwargs): HF loops pass it first, or as `hidden_states=`."""
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _run(module, chain: tuple[LayerHook, ...], innermost: Callable, args, kwargs):
    if not chain:
        return innermost(*args, **kwargs)
    hook, rest = chain[0], chain[1:]
    args, kwargs = hook.pre_forward(module, *args, **kwargs)
    inner = functools.partial(_inner, module, rest, innermost)
    return hook.post_forward(module, hook.new_forward(module, inner, *args, **kwargs))


def _inner(module, chain, innermost, *args, **kwargs):
    return _run(module, chain, innermost, args, kwargs)


def _dispatch(module, where: str, innermost: Callable, args, kwargs):
    registry = vars(module).get(_REGISTRY)
    return _run(module, registry.chain(where) if registry is not None else (), innermost, args, kwargs)


def _subclass(cls: type) -> type:
    """`cls` with `__call__` and `forward` that run the registry's hooks around the class's own. The class's own
    are reached through `cls` itself, so a call still works after the module has left the subclass."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        def __call__(self, *args, **kwargs):
            return _dispatch(self, "call", functools.partial(cls.__call__, self), args, kwargs)

        def forward(self, *args, **kwargs):
            return _dispatch(self, "forward", functools.partial(cls.forward, self), args, kwargs)

        sub = _SUBCLASSES[cls] = type(cls.__name__, (cls,), {
            "__call__": __call__, "forward": forward, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return sub
