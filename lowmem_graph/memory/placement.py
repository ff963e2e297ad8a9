"""Where every frozen tensor lives, decided and applied in one place, for each phase of a run.

Without a memory plan every node loads onto the device, whole, and stays there. Under a plan (`--gpu-mem`):

* loading: every node loads into host memory (`load_device`), computing in the device's dtype;
* the frozen pass (`frozen_pass(node)`, one node at a time): the layers the node runs (a reader's up to its read
  layer, a refiner's below its injection layer), its final norm and rotary tables go to the device, grouped as the
  plan says: resident groups move, the rest stream through the node's own slots. The embedding table stays on the
  host (a lookup moves B x T x d activations, not the table). Everything goes back when the node is done;
* steps (`start_steps(graph)`: training and evaluation): each refiner's layers from its injection layer up, in
  the plan's checkpointed groups, resident or streamed, with its final norm and rotary tables (and, under the lm
  objective, its LM head); the readers and the layers below injection stay on the host, since the prefix cache
  holds what they produce. `stop_steps()` gives all of it back.

The nodes know nothing of this: they compute on `node.device`, which the placement sets while it moves them.
"""
from __future__ import annotations

import contextlib

import torch

from ..nodes import FrozenNode, node_device
from . import stream


class Placement:
    """One run's placement: `plan` (a memory.estimate.Plan) or None for everything on `device`."""

    def __init__(self, device: torch.device | str, plan=None):
        self.device = _exact(torch.device(device))
        self.plan = plan
        self.stores: dict[str, object] = {}     # node -> its store.GroupStore: the layer groups on disk
        self.streamers: list[stream.LayerStreamer] = []
        self._moved: list[tuple[FrozenNode, torch.device]] = []    # nodes start_steps moved, and their homes
        from .kept import Kept

        # what a layer-major step keeps between its phases: on the device, or in pinned host memory
        self.kept = Kept(self.device, getattr(plan, "schedule", None) == "layer-major-host")

    def spill(self, node: FrozenNode) -> None:
        """The node's layer groups the plan keeps on disk go there (written once into the node cache, store.py),
        their host copies released: called as each node loads, before the next one. At rest they are views of
        the file's pages."""
        from ..tiny import cache_root
        from .store import GroupStore

        name = node.spec.name
        if self.plan is None or name in self.stores:
            return
        frozen = self.plan.frozen.get(name)
        groups = [g for g in self.plan.groups if g.node == name] + (frozen.groups if frozen else [])
        ranges = [list(range(g.first, g.last)) for g in groups if g.disk]
        if ranges:
            self.stores[name] = GroupStore(cache_root() / "nodes" / "disk", node.identity, node.layers, ranges)

    def _disk(self, name: str, groups) -> dict:
        """Group index -> the store, for those of `groups` on disk (none where the node was never spilled: its
        groups are then still in host memory, and stream from there)."""
        return {i: self.stores[name] for i, g in enumerate(groups) if g.disk and name in self.stores}

    def device_of(self, node: FrozenNode) -> torch.device:
        """Where a node computes: its spec's `device`, else the run's."""
        return _exact(node_device(node.spec, self.device))

    @property
    def load_device(self) -> torch.device:
        """Where nodes load: the host under a plan (each phase moves what it needs), else the device."""
        return torch.device("cpu") if self.plan is not None else self.device

    @contextlib.contextmanager
    def frozen_pass(self, node: FrozenNode, needed: int):
        """Node `node` on the device for the block, as the plan places its frozen-pass layers (its first `needed`,
        up to its highest input-only part); back on the host after.
        Without a plan (the node already lives on the device) nothing moves. Yields the LayerStreamer that placed
        the layers, or None."""
        home = _exact(node.base.get_input_embeddings().weight.device)
        device = self.device_of(node)
        placement = self.plan.frozen.get(node.spec.name) if self.plan is not None else None
        if placement is None and home == device:
            yield None
            return
        if placement is None:
            groups, resident, slots = ([list(range(needed))] if needed else []), {0}, 1
        else:
            groups = [list(range(g.first, g.last)) for g in placement.groups]
            resident = {i for i, g in enumerate(placement.groups) if g.resident}
            slots = max(1, placement.prefetch_depth)
            if sum(map(len, groups)) != needed:
                raise RuntimeError(f"the plan places {sum(map(len, groups))} frozen-pass layers of "
                                   f"{node.spec.name!r}, which needs its first {needed}")
        small = norm_and_rotary(node)
        for part in small:
            part.to(device)
        disk = self._disk(node.spec.name, placement.groups) if placement is not None else {}
        streamer = stream.LayerStreamer(node.layers, groups, resident, device, slots=slots, disk=disk)
        node.device = device
        try:
            yield streamer
        finally:
            streamer.detach()
            for part in small:
                part.to(home)
            node.device = home
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def start_steps(self, graph) -> None:
        """Place the refiners' upper layers for training steps and evaluation, as the plan says (a no-op without
        a plan, or when they are placed already). If a later refiner's streamer fails, the earlier ones let go of
        their layers and pages."""
        if self.plan is None or self.streamers:
            return
        try:
            for name, (first, _) in graph.stepped_layers().items():
                node = graph.nodes[name]
                mine = [g for g in self.plan.groups if g.node == name]
                if not mine or mine[0].first != first:
                    raise RuntimeError(f"the plan's groups for {name} do not start at the first layer a step runs, "
                                       f"{first}")
                device = self.device_of(node)
                self._moved.append((node, node.device))
                for part in norm_and_rotary(node, head=True):
                    part.to(device)
                node.device = device
                self.streamers.append(stream.LayerStreamer(node.layers, [list(range(g.first, g.last)) for g in mine],
                                                    {i for i, g in enumerate(mine) if g.resident}, device,
                                                    slots=max(1, self.plan.prefetch_depth),
                                                    plain={i for i, g in enumerate(mine) if not g.checkpointed},
                                                    disk=self._disk(name, mine)))
        except BaseException:
            self.stop_steps()
            raise

    def stop_steps(self) -> None:
        """Give back what `start_steps` placed: streamers detach (their pinned slabs unregister)."""
        for streamer in self.streamers:
            streamer.detach()
        self.streamers = []
        for node, home in self._moved:
            for part in norm_and_rotary(node, head=True):
                part.to(home)
            node.device = home
        self._moved = []


def norm_and_rotary(node: FrozenNode, head: bool = False) -> list[torch.nn.Module]:
    """The small parts a node's layers need beside them on the device: the final norm and rotary tables, and with
    `head` (steps of the lm objective) the LM head. Never the head for the frozen pass, which has no use for it:
    a tied head is the embedding table itself, which stays on the host."""
    parts = [node.norm, getattr(node.base, "rotary_emb", None), getattr(node.base, "wpe", None)]
    parts += [node.model.get_output_embeddings()] if head else []
    return [m for m in parts if m is not None]


def _exact(device: torch.device) -> torch.device:
    """"cuda" and "cuda:0" are one device: compare them as such."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
