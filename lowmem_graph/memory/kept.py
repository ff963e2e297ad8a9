"""What a layer-major step keeps between its forward and backward: on the device, or in host memory.

Under the layer-major schedules (step.py) every micro-batch's forward runs before any backward, so each
checkpointed group's input (and each micro-batch's head) is kept until backward comes back down to it. Under
"layer-major" these stay on the device; under "layer-major-host" (the plan had no room for them) every tensor the
forward saves for backward outside a checkpointed group goes to host memory, pinned on CUDA, and comes back when
backward unpacks it: copies without blocking the host, ordered on the compute stream after the op that made the
tensor and before the op that reads it. Weights (trainable or frozen) are never moved: they are not activations.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch

from .host import page_locked_empty


class Kept:
    def __init__(self, device, on_host: bool):
        self.device = torch.device(device)
        self.on_host = on_host
        self.fetched = 0        # bytes brought back to the device (host-to-device traffic of activations)

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """`t` in host memory (pinned on CUDA), copied without blocking the host; as it is when not on_host."""
        if not self.on_host:
            return t
        host = page_locked_empty(t.shape, t.dtype) if self.device.type == "cuda" else torch.empty(t.shape, dtype=t.dtype)
        return host.copy_(t, non_blocking=True)

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        if not self.on_host:
            return t
        self.fetched += t.nbytes
        return t.to(self.device, non_blocking=True)

    @contextlib.contextmanager
    def saved_for_backward(self, weights: Callable[[], list[torch.Tensor]]):
        """Within the block, what autograd saves for backward on the device is kept (`keep`) and fetched back when
        backward needs it; tensors sharing storage with `weights()` (modules' parameters and buffers) stay. A tensor
        saved several times (a layer group's masks) is copied once while it lives."""
        if not self.on_host:
            yield
            return
        stay = {w.untyped_storage().data_ptr() for w in weights()}
        copies: dict[int, tuple] = {}

        def pack(t):
            if t.device != self.device or t.untyped_storage().data_ptr() in stay:
                return t
            known = copies.get(id(t))
            if known is not None and known[0]() is t and known[1] == t._version:
                return known[2]
            host = _OnHost(self.keep(t))
            copies[id(t)] = (weakref.ref(t), t._version, host)
            return host

        def unpack(packed):
            return self.fetch(packed.tensor) if isinstance(packed, _OnHost) else packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield


class _OnHost:
    """A kept tensor's host copy (a wrapper, so that unpacking knows it from a tensor that stayed)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
