"""Memory a run uses, measured the same way everywhere: host RSS (psutil) and CUDA peaks (torch), and, on any
device, the bytes of tensors a block of code allocates (`LiveBytes`: how the planner's constants are checked on
a CPU, where torch keeps no allocator statistics)."""
from __future__ import annotations

import weakref

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MB = 1024 ** 2


def memory_snapshot(device: torch.device | str | None = None) -> dict[str, float]:
    """Host RSS now and, on CUDA, the peak allocated/reserved bytes since the last reset, in MiB."""
    snap = {"host_rss_mb": psutil.Process().memory_info().rss / MB}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        snap["cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / MB
        snap["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
        snap["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / MB
    return snap


def format_snapshot(snap: dict[str, float]) -> str:
    text = f"host RSS {snap['host_rss_mb']:.0f} MiB"
    if "cuda_peak_allocated_mb" in snap:
        text += (f", GPU peak {snap['cuda_peak_allocated_mb']:.0f} MiB allocated / "
                 f"{snap['cuda_peak_reserved_mb']:.0f} MiB reserved")
    return text


def out_of_memory_message(error: BaseException, plan=None) -> str:
    """One line for a CUDA OOM: what the plan predicted and what to change."""
    first = str(error).splitlines()[0] if str(error) else "CUDA out of memory"
    predicted = (f"the plan predicted a peak of {plan.peak / 2**30:.2f} GiB within {plan.budget / 2**30:.2f} GiB; "
                 if plan is not None else "no --gpu-mem plan was applied; ")
    return (f"CUDA out of memory ({first[:160]}); {predicted}try a smaller --gpu-mem (the plan then keeps less "
            "resident and streams more), a smaller --batch-size, or keep the prefix cache on")


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the block that are still alive (`live`), and the most that were
    alive at once (`peak`; `reset_peak()` starts a new one). A storage counts from the op that made it until it is
    freed; views and in-place results share their input's storage and count nothing. Storages made before the
    block (weights, inputs) never count, so `live` at the end is what the block left behind."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.live_at_reset = 0
        self._sizes: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.live_at_reset = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key)
