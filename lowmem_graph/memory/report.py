"""Memory a run uses, measured the same way everywhere: host RSS (psutil) and CUDA peaks (torch)."""
from __future__ import annotations

import psutil
import torch

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
