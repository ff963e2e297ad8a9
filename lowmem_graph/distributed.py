"""More than one process, through PyTorch's own distributed engine (torchrun, or accelerate launch).

A launcher starts one process per rank with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its
environment; `current()` starts the default process group from them once (NCCL on CUDA, gloo on the CPU) and says
who this process is. Nothing here is home-made: the process group, `DistributedDataParallel` (train.py) and the
collectives are PyTorch's. What this module adds is the sharding rule every part uses (`shard`: contiguous, balanced
slices, so the ranks' parts concatenated are the single-process order) and a few collectives by name.

Without those variables (a plain `lowmem-graph train`) there is one rank and every function here is a no-op.
A rank that fails ends its process; the launcher then stops the others, and a collective waiting on the failed
rank errors out when its connection closes (gloo) or at the group's timeout, so no rank hangs.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

TIMEOUT = datetime.timedelta(minutes=30)    # a collective's limit (the frozen pass of a large node can be long)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes what a run writes once: metrics, plots, checkpoints, predictions, manifests."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, requested: torch.device) -> torch.device:
        """Each rank's own GPU (cuda:LOCAL_RANK) where the run asks for CUDA; the CPU stays the CPU. A GPU named by
        index would be every rank's: refused."""
        if self.active and requested.type == "cuda":
            if requested.index is not None:
                raise UserError(f"--device {requested} with {self.world} ranks would put every rank on that one GPU: "
                                "give --device cuda (each rank takes its own, cuda:LOCAL_RANK), and choose the GPUs "
                                "with CUDA_VISIBLE_DEVICES")
            return torch.device("cuda", self.local_rank)
        return requested


def current() -> Ranks:
    """This process's place among the ranks; starts the default process group on first use under a launcher."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local < torch.cuda.device_count():   # whatever the backend: the current device is this rank's own (a CPU
            torch.cuda.set_device(local)        # run may have more ranks than the machine has GPUs)
        nccl = torch.cuda.is_available() and os.environ.get("LOWMEM_GRAPH_BACKEND", "") != "gloo"
        dist.init_process_group("nccl" if nccl else "gloo", timeout=TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard(items: list, ranks: Ranks) -> list:
    """This rank's contiguous slice of `items` (the first `len % world` ranks take one more): the slices in rank
    order are `items` again."""
    if not ranks.active:
        return items
    size, extra = divmod(len(items), ranks.world)
    start = ranks.rank * size + min(ranks.rank, extra)
    return items[start:start + size + (ranks.rank < extra)]


def shard_batches(items: list, batch_size: int, ranks: Ranks) -> list:
    """This rank's slice of `items` in whole batches of `batch_size` (`shard` over the batches): each batch is the
    one a single process forms, so every prompt meets the same neighbours and padding as it would there."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return [item for batch in shard(batches, ranks) for item in batch]


def all_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum over ranks (in place; returned), in the tensor's own dtype (fp64 stays fp64)."""
    if ranks.active:
        if dist.get_backend() == "nccl" and not tensor.is_cuda:
            moved = tensor.cuda()
            dist.all_reduce(moved)
            tensor.copy_(moved.cpu())
        else:
            dist.all_reduce(tensor)
    return tensor


def gather(obj, ranks: Ranks) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not ranks.active:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def on_main(fn, ranks: Ranks):
    """`fn()` run by rank 0 alone (making the run folder, say), its result given to every rank; if it fails with
    a UserError, every rank fails with that same one line."""
    from .errors import UserError

    if not ranks.active:
        return fn()
    outcome = None
    if ranks.main:
        try:
            outcome = ("ok", fn())
        except UserError as e:
            outcome = ("error", str(e))
    kind, value = gather(outcome, ranks)[0]
    if kind == "error":
        raise UserError(value)
    return value


def main_first(fn, ranks: Ranks):
    """`fn()` on rank 0 first, then on the other ranks: what it fills once (built tiny models, quantised copies of
    the nodes) the others then read. A UserError on rank 0 fails every rank with that same one line."""
    from .errors import UserError

    if not ranks.active:
        return fn()
    if ranks.main:
        try:
            result = fn()
        except UserError as e:
            gather(str(e), ranks)
            raise
        gather(None, ranks)
        return result
    failed = gather(None, ranks)[0]
    if failed is not None:
        raise UserError(failed)
    return fn()


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def finish() -> None:
    """End the process group (at the end of a command), so the launcher sees a clean exit."""
    if dist.is_initialized():
        dist.destroy_process_group()
