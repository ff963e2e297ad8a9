"""Memory a run uses, measured the same way everywhere: host RSS (psutil) and CUDA peaks (torch), and, on any
device, the bytes of tensors a block of code allocates (`LiveBytes`: how the planner's constants are checked on
a CPU, where torch keeps no allocator statistics)."""
from __future__ import annotations

import ctypes
import re
import resource
import weakref

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KiB, MiB, GiB = 2 ** 10, 2 ** 20, 2 ** 30
MB = MiB        # the metrics' "_mb" keys are MiB


def format_mib(n: int | float) -> str:
    """Bytes as MiB the way every table here prints them: thousands separated, two decimals below 10 MiB."""
    return f"{n / MiB:,.0f} MiB" if n >= 10 * MiB or n == 0 else f"{n / MiB:.2f} MiB"


def peak_rss_mib() -> float:
    """The process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def outside_torch_bytes(device) -> int:
    """Device memory in use outside torch's caching allocator (the CUDA context, library handles, loaded kernels),
    read from the driver."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def others_on_the_gpu() -> int | None:
    """Bytes in use on this machine's one GPU before this process makes its CUDA context: other programs (a desktop,
    another run) and the driver's reserve, which cudaMemGetInfo counts as used too, so a peak measured through it
    includes them. Read through NVML, which makes no context. None where NVML is missing, or with several GPUs
    (which one this process will use is not known from NVML's numbering)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count, handle = ctypes.c_uint(), ctypes.c_void_p()
        memory = (ctypes.c_ulonglong * 3)()         # nvmlMemory_t: total, free, used
        if (nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value != 1
                or nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) != 0
                or nvml.nvmlDeviceGetMemoryInfo(handle, memory) != 0):
            return None
        return int(memory[2])
    finally:
        nvml.nvmlShutdown()


def device_peaks(device, outside: int = 0) -> dict[str, float]:
    """torch's peaks since the last reset and the whole device's: what is in use outside torch's allocator (the
    larger of `outside`, read earlier, and now: kernels and handles load lazily) plus the peak reserved, in MiB."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    outside = max(outside, outside_torch_bytes(device))
    reserved = torch.cuda.max_memory_reserved(device)
    return {"measured_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / MiB,
            "measured_peak_reserved_mib": reserved / MiB, "measured_context_mib": outside / MiB,
            "measured_peak_mib": (outside + reserved) / MiB}


def peak_during(fn, device) -> int:
    """Bytes `fn()` allocates at its peak above what was allocated before: torch's CUDA statistics on a GPU,
    `LiveBytes` elsewhere."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveBytes() as live:
        fn()
    return live.peak


def memory_snapshot(device: torch.device | str | None = None, others: tuple = ()) -> dict[str, float]:
    """Host RSS now and, on CUDA, the peak allocated/reserved bytes since the last reset, in MiB; `others`: the
    other cards a run computes on (nodes on devices of their own), each's peak allocated as "cuda:N_peak_..."."""
    snap = {"host_rss_mb": psutil.Process().memory_info().rss / MB}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        snap["cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / MB
        snap["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
        snap["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / MB
    for other in others:
        snap[f"{other}_peak_allocated_mb"] = torch.cuda.max_memory_allocated(other) / MB
    return snap


def format_snapshot(snap: dict[str, float]) -> str:
    text = f"host RSS {snap['host_rss_mb']:.0f} MiB"
    if "cuda_peak_allocated_mb" in snap:
        text += (f", GPU peak {snap['cuda_peak_allocated_mb']:.0f} MiB allocated / "
                 f"{snap['cuda_peak_reserved_mb']:.0f} MiB reserved")
    for key, value in snap.items():
        if key.startswith("cuda:") and key.endswith("_peak_allocated_mb"):
            text += f", {key.split('_')[0]} peak {value:.0f} MiB allocated"
    return text


def out_of_memory_message(error: BaseException, plan=None) -> str:
    """One line for a CUDA OOM: what the plan predicted (for the card that ran out, when the plan spans several:
    torch names it as "GPU N") and what to change."""
    first = str(error).splitlines()[0] if str(error) else "CUDA out of memory"
    predicted = "no --gpu-mem plan was applied; "
    if plan is not None:
        peak, budget, where = plan.peak, plan.budget, ""
        card = re.search(r"\bGPU (\d+)\b", str(error))
        device = f"cuda:{card.group(1)}" if card else None
        if plan.devices and device in plan.devices:
            peak, budget, where = plan.devices[device]["peak"], plan.devices[device]["budget"], f" on {device}"
        predicted = f"the plan predicted a peak of {peak / GiB:.2f} GiB within {budget / GiB:.2f} GiB{where}; "
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
