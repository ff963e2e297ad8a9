"""Layer-group streaming: the decoder layers that do not fit the device budget visit it group by group.

Host tier: one slab (a `HostSlab`) holding every tensor of every streamed group (packed 4-bit weights, their
quant-state tensors, norms), each at an aligned offset, so a group moves as one copy. The slab is an anonymous
mmap of its own: it starts on a page boundary and spans whole pages, so two streamers' slabs never share a page
and their page-locking (`cudaHostRegister`, on CUDA) never collides. `pin_memory()` would go through PyTorch's
caching host allocator, which rounds every allocation up to a power of two. Device tier: the resident groups,
which stay, and two slots (double buffer) sized for the largest streamed group.

A group is loaded by one copy, slab -> slot, on a side CUDA stream, then its tensors are rebound to typed
views into the slot (`param.data = view`, `quant_state.absmax = view`, ...); at rest they are views into the
slab. Group k of the streamed order uses slot (k + shift) % 2. So prefetching the next group in the direction
of travel (up in the forward, down in backward) never hits the slot in use, and a group reloaded for its
backward lands where its forward read it: bitsandbytes' backward reads a view of the packed weight taken in
the forward. A pass without grad (the frozen pass, evaluation) ends by prefetching the first group for the
next pass; with an odd number of streamed groups that group's slot is the one in use, so the shift flips
between such passes and the prefetch goes to the free slot. On CPU the same code runs
with plain copies, so the tests exercise layout, rebinding, slot reuse and prefetch order for real.

Gradients through streamed groups need checkpointing (what the forward saved would be overwritten), so every
group runs through `GroupCheckpoint` (hooks on the layers' forwards, hooks.py), which also calls the streamer when
a group starts, in either direction. The page-locked host memory and its CUDA calls are host.py's.

Disk tier: a streamed group the plan keeps on disk (store.py) has no place in the slab; at rest its tensors are
views of the store file's pages. A reader thread reads it from the file (positioned reads) into one of two staging
buffers at the slab's end, ahead of its copy (when the group before it starts, or the one before that where two
slots hold both), and the copy goes staging -> slot as from the slab; on CUDA the reader first waits for the copy
that last read its buffer.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..nodes import default_device
from .checkpoint import GroupCheckpoint, check_groups
from .host import HostSlab

ALIGN = 256     # bytes: CUDA's allocation alignment, plenty for vector loads of every dtype


class LayerStreamer:
    """Keep groups `resident` (indices into `groups`) on `device`; stream the others through `slots` slots.

    `groups` are lists of consecutive layer indices, in execution order, each run under checkpoint but those in
    `plain` (resident groups that keep their activations).
    `slots=2` double-buffers; `slots=1` halves the slot memory, but then nothing can be prefetched.
    `pin` page-locks the slab (default: on CUDA). `disk`: streamed groups that live on disk (group index ->
    store.GroupStore): they take no room in the slab; a reader thread reads each into one of two staging buffers at
    the slab's end, one group ahead of its copy. Installed on construction; a construction that fails leaves every
    layer as it was.
    `detach()` (or leaving a `with` block) puts every tensor back on its device, streamed ones as slab views.
    """

    def __init__(self, layers: torch.nn.ModuleList, groups: Sequence[Sequence[int]], resident: Iterable[int] = (),
                 device: torch.device | str | None = None, slots: int = 2, pin: bool | None = None,
                 plain: Iterable[int] = (), disk: dict | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        groups = check_groups(groups, len(layers))
        resident = set(resident)
        if not resident <= set(range(len(groups))):
            raise ValueError(f"resident groups {sorted(resident)} are not indices into {len(groups)} groups")
        if slots not in (1, 2):
            raise ValueError(f"slots must be 1 or 2, got {slots}")
        self.order = [g for g in range(len(groups)) if g not in resident]      # streamed groups, in order
        plain = set(plain)
        if plain & set(self.order):
            raise ValueError(f"streamed groups {sorted(plain & set(self.order))} must be checkpointed: their weights "
                             "leave the device before backward")
        self._rank = {g: rank for rank, g in enumerate(self.order)}
        disk = disk or {}
        self._stores = {self._rank[g]: (store, tuple(groups[g])) for g, store in disk.items() if g in self._rank}
        sites = [_sites([layers[i] for i in group]) for group in groups]
        resident_sites = [site for g in sorted(resident) for site in sites[g]]
        self.resident_bytes = sum({_same(t): t.nbytes for _, _, t in resident_sites}.values())
        layouts = [_layout(sites[g]) for g in self.order]
        self.slot_bytes = max((nbytes for _, nbytes in layouts), default=0)
        n_slots = min(slots, len(self.order))

        self._starts, total = [], 0
        for rank, (_, nbytes) in enumerate(layouts):
            self._starts.append(_align(total))
            total = self._starts[-1] + (0 if rank in self._stores else nbytes)
        staging = max((layouts[rank][1] for rank in self._stores), default=0)
        self._staging_starts = [_align(total), _align(_align(total) + staging)] if staging else []
        total = self._staging_starts[-1] + staging if staging else total
        self._groups = []       # per streamed group: (nbytes, [(owner, attr, offset, nbytes, dtype, shape)])
        for (placed, nbytes), g in zip(layouts, self.order):
            self._groups.append((nbytes, [(owner, attr, offset, t.nbytes, t.dtype, t.shape)
                                          for (owner, attr, t), offset in zip(sites[g], placed)]))
        self._all_sites = [(owner, attr) for group in sites for owner, attr, _ in group]
        self._streamed_sites = {(id(owner), attr) for g in self.order for owner, attr, _ in sites[g]}
        self._stream = self._ready = None
        self.slots, self._in_slot = [], []
        self.host = HostSlab(total, self.device)
        self.slab = self.host.tensor
        originals = [site for group in sites for site in group]
        self.checkpoint = GroupCheckpoint(layers, groups, before_group=self.load_group, plain=plain)
        try:
            for rank, (start, (placed, _), g) in enumerate(zip(self._starts, layouts, self.order)):
                for (_, _, t), offset in zip(sites[g] if rank not in self._stores else (), placed):
                    self.slab[start + offset: start + offset + t.nbytes].copy_(t.reshape(-1).view(torch.uint8))
            if self.device.type == "cuda" if pin is None else pin:
                self.host.pin()         # before anything moves
            if self.device.type == "cuda" and self.order:
                self._stream = torch.cuda.Stream(self.device)
            for rank in range(len(self.order)):
                self._bind(rank, *self._home(rank))
            self._resident = [(owner, attr, t.device) for owner, attr, t in resident_sites]
            # a resident group on disk goes back to its views of the file, not to a fresh copy in host memory
            self._on_disk = [(owner, attr, t) for g in sorted(resident & set(disk)) for owner, attr, t in sites[g]]
            moved = _moved([t for *_, t in resident_sites], [self.device] * len(resident_sites))
            for (owner, attr, _), t in zip(resident_sites, moved):
                setattr(owner, attr, t)
            self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
            # a slot is reused only after the copy stream's writes into it, even if the streamer is dropped undetached
            for slot in self.slots if self._stream is not None else ():
                slot.record_stream(self._stream)
        except BaseException:
            for owner, attr, t in originals:        # every tensor back as it was, then the hooks off, then the pages
                setattr(owner, attr, t)
            self.checkpoint.detach()
            self.slots = []
            self._release_host()
            raise
        self._in_slot = [None] * n_slots      # which streamed group each slot holds (or is being filled with)
        self._staged = [None] * len(self._staging_starts)     # (rank, the reader's future) per staging buffer
        self._copied = [None] * len(self._staging_starts)     # CUDA: an event after the last copy out of each
        self._reader = None
        if self._stores:
            from concurrent.futures import ThreadPoolExecutor

            self._reader = ThreadPoolExecutor(1, thread_name_prefix="lowmem-disk")
        self.disk_reads = self.disk_bytes = 0      # groups read from disk (ahead of use, or on demand)
        self._shift = 0
        if self._stream is not None:
            self._ready = [torch.cuda.Event() for _ in self.slots]
        self.device_bytes = self.resident_bytes + n_slots * self.slot_bytes    # the device tier: resident + slots
        self.peak_device_bytes = self.held_bytes()   # measured: see held_bytes
        self.loads = 0          # group copies slab -> slot
        self.misses = 0         # groups not prefetched when they started: the compute waited for a whole copy
        self.streamed_bytes = 0
        self.copy_times: list | None = None     # set to [] to time each copy on its stream (CUDA events; benchmarks)
        self._attached = True

    def detach(self) -> None:
        """Take the hooks off the layers; streamed tensors become slab views again, resident ones go back.
        The slab stays (the streamed tensors live in it) but is no longer page-locked."""
        if not self._attached:
            return
        self._attached = False
        self.checkpoint.detach()
        if self._reader is not None:
            self._reader.shutdown(wait=True)        # no read may still write into the slab
        self._release_host()
        for rank in range(len(self.order)):
            self._bind(rank, *self._home(rank))
        filed = {(id(owner), attr) for owner, attr, _ in self._on_disk}     # back to their file views, uncopied
        home = [site for site in self._resident if (id(site[0]), site[1]) not in filed]
        back = _moved([getattr(owner, attr) for owner, attr, _ in home], [d for *_, d in home])
        for (owner, attr, _), t in zip(home, back):
            setattr(owner, attr, t)
        for owner, attr, t in self._on_disk:
            setattr(owner, attr, t)
        self.slots, self._in_slot, self.device_bytes = [], [], 0

    def copy_rate(self) -> float | None:
        """Host-to-device GB/s of the copies timed so far (`copy_times`), from their own CUDA events: what the
        slab-to-slot copies achieved, whatever the compute around them did."""
        if not self.copy_times:
            return None
        self.copy_times[-1][2].synchronize()
        seconds = sum(begin.elapsed_time(end) for _, begin, end in self.copy_times) / 1000
        return sum(n for n, _, _ in self.copy_times) / seconds / 1e9

    def _release_host(self) -> None:
        """No copy may still read the slab when it stops being page-locked."""
        if self._stream is not None:
            self._stream.synchronize()
            self._stream = None
        self.host.unpin()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def held_bytes(self) -> int:
        """Bytes of device-tier memory the layers' tensors use now, measured from what they are bound to: a
        slot counts whole, however little of it a group fills; a streamed group at home (the host slab, or its
        store's file pages for one on disk) counts nothing; any other tensor counts its own bytes (not its
        storage's: on the host a resident tensor may be a view into an earlier slab)."""
        slots = {slot.untyped_storage().data_ptr(): slot.nbytes for slot in self.slots}
        slab = self.slab.untyped_storage().data_ptr()
        homes = {store.views[group].untyped_storage().data_ptr() for store, group in self._stores.values()}
        held, tensors = {}, {}
        for owner, attr in self._all_sites:
            t = getattr(owner, attr)
            storage = t.untyped_storage().data_ptr()
            if storage in slots:
                held[storage] = slots[storage]
            elif storage != slab and not (storage in homes and (id(owner), attr) in self._streamed_sites):
                tensors[(t.data_ptr(), t.nbytes)] = t.nbytes
        return sum(held.values()) + sum(tensors.values())

    def load_group(self, g: int, backward: bool) -> None:
        """Group g is about to compute: have it in its slot, then prefetch the next group in this direction."""
        rank = self._rank.get(g)
        if rank is None:
            return
        slot = self._slot(rank)
        if self._in_slot[slot] != rank:
            self.misses += 1
            self._load(rank)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        following = rank - 1 if backward else rank + 1
        if following == len(self.order) and not torch.is_grad_enabled():
            following = 0       # no backward comes: the next pass starts from the bottom
            if len(self.order) % 2 and len(self.slots) == 2:
                self._shift ^= 1    # odd count: group 0's usual slot is the one in use; the next pass swaps slots
        if len(self.slots) == 2 and 0 <= following < len(self.order) and self._slot(following) != slot:
            self._load(following)
        if 0 <= following < len(self.order):    # the next group copied into a slot: read it (or the one after) now
            ahead = following if self._in_slot[self._slot(following)] != following else following + (-1 if backward
                                                                                                      else 1)
            if ahead in self._stores and self._staging_of(ahead) is None:
                self._read(ahead)
        self.peak_device_bytes = max(self.peak_device_bytes, self.held_bytes())

    def _slot(self, rank: int) -> int:
        """Streamed group `rank` goes to this slot: alternating, so the next group in either direction never
        lands in the slot in use. The pairing changes only between passes without grad (see load_group), so a
        group reloaded for its backward finds the slot its forward used."""
        return (rank + self._shift) % len(self.slots)

    def _load(self, rank: int) -> None:
        slot = self._slot(rank)
        if self._in_slot[slot] == rank:
            return
        if self._in_slot[slot] is not None:
            self._bind(self._in_slot[slot], *self._home(self._in_slot[slot]))
        nbytes = self._groups[rank][0]
        staged = None
        if rank in self._stores:
            staged = self._staging_of(rank)
            staged = self._read(rank) if staged is None else staged
            self._staged[staged][1].result()        # the reader has the group's bytes in the buffer
            start = self._staging_starts[staged]
            source = self.slab[start: start + nbytes]
        else:
            source = self.slab[self._starts[rank]: self._starts[rank] + nbytes]
        target = self.slots[slot][:nbytes]
        if self._stream is None:
            target.copy_(source)
        else:
            # the slot's previous group was enqueued on the compute stream before now: wait for it, not more
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                timed = self.copy_times is not None
                if timed:
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record(self._stream)
                target.copy_(source, non_blocking=True)
                self._ready[slot].record(self._stream)
                if staged is not None:      # the reader waits for this before it fills the buffer again
                    self._copied[staged] = torch.cuda.Event()
                    self._copied[staged].record(self._stream)
                if timed:
                    end.record(self._stream)
                    self.copy_times.append((nbytes, begin, end))
        if staged is not None:
            self._staged[staged] = None
        self._bind(rank, self.slots[slot], 0)
        self._in_slot[slot] = rank
        self.loads += 1
        self.streamed_bytes += nbytes

    def _home(self, rank: int) -> tuple[torch.Tensor, int]:
        """Where a streamed group's tensors point at rest: its part of the slab, or its pages of the disk store."""
        if rank in self._stores:
            store, group = self._stores[rank]
            return store.views[group], 0
        return self.slab, self._starts[rank]

    def _staging_of(self, rank: int) -> int | None:
        return next((b for b, staged in enumerate(self._staged) if staged and staged[0] == rank), None)

    def _read(self, rank: int) -> int:
        """Have the reader thread read a disk group into a free staging buffer (the other one may hold the group
        being copied out, or read ahead); returns the buffer."""
        free = [b for b, staged in enumerate(self._staged) if staged is None]
        buffer = free[0] if free else 0
        if self._staged[buffer] is not None:
            self._staged[buffer][1].result()      # a read ahead that is not wanted now: let it finish first
        store, group = self._stores[rank]
        start, copied = self._staging_starts[buffer], self._copied[buffer]
        target = self.slab[start: start + self._groups[rank][0]]

        def fill():
            if copied is not None:
                copied.synchronize()        # the last copy out of this buffer has finished
            return store.read_into(group, target)

        self._staged[buffer] = (rank, self._reader.submit(fill))
        self.disk_reads += 1
        self.disk_bytes += self._groups[rank][0]
        return buffer

    def _bind(self, rank: int, buffer: torch.Tensor, start: int) -> None:
        for owner, attr, offset, nbytes, dtype, shape in self._groups[rank][1]:
            setattr(owner, attr, buffer[start + offset: start + offset + nbytes].view(dtype).view(shape))


def _sites(layers) -> list[tuple[object, str, torch.Tensor]]:
    """(owner, attribute, tensor) for every tensor the layers' forward reads.

    Parameters are rebound through `.data`, so the Parameter objects (and bitsandbytes' Params4bit) stay;
    quant-state tensors (absmax, code, offset, and those of the nested state2) and buffers are reassigned on
    their owner, not changed in place, so a tensor also used outside the group is left alone. An LLM.int8 linear
    (bitsandbytes' Linear8bitLt) computes from `state.CB` and `state.SCB` and points `weight.data` at `state.CB`
    after every forward: both sites are listed, and `_layout` gives the alias the same bytes.
    """
    sites, seen = [], set()

    def add(owner, attr, t):
        if t is not None and (id(owner), attr) not in seen:
            seen.add((id(owner), attr))
            sites.append((owner, attr, t))

    for layer in layers:
        for module in layer.modules():
            int8 = getattr(module, "state", None)
            if hasattr(module, "init_8bit_state") and int8 is not None:
                if getattr(module.weight, "CB", None) is not None:
                    module.init_8bit_state()    # what its first forward does: the int8 weight moves to `state`
                add(int8, "CB", int8.CB)
                add(int8, "SCB", int8.SCB)
            for p in module._parameters.values():
                if p is None:
                    continue
                add(p, "data", p.data)
                state = getattr(p, "quant_state", None)
                while state is not None:
                    for attr, value in vars(state).items():
                        if isinstance(value, torch.Tensor):
                            add(state, attr, value)
                    state = getattr(state, "state2", None)
            for name, b in module._buffers.items():
                add(module, name, b)
    return sites


def _same(t: torch.Tensor) -> tuple:
    """Tensors with equal keys are one tensor under two names (an int8 weight and its state's CB)."""
    return t.data_ptr(), t.nbytes, t.dtype, tuple(t.shape), t.stride()


def _layout(sites) -> tuple[list[int], int]:
    """Aligned byte offsets of the sites' tensors laid out back to back (an alias shares its tensor's offset),
    and the bytes they span."""
    offsets, end, placed = [], 0, {}
    for _, _, t in sites:
        key = _same(t) if t.nbytes else None
        if key not in placed:
            placed[key] = _align(end)
            end = placed[key] + t.nbytes
        offsets.append(placed[key])
    return offsets, end


def _moved(tensors, devices) -> list[torch.Tensor]:
    """Each tensor on its device, an alias moved once with its tensor."""
    moved = {}
    for t, device in zip(tensors, devices):
        if (_same(t), device) not in moved:
            moved[_same(t), device] = t.to(device)
    return [moved[_same(t), device] for t, device in zip(tensors, devices)]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
