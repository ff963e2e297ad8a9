"""Page-locked host memory: each streamer's slab (`HostSlab`, an anonymous mmap of its own, page-locked with
cudaHostRegister), page-locked copies for cached rows and kept activations, and the CUDA runtime calls behind them
(registration, clearing the runtime's last error after a refusal). Where the machine will not lock that much
(WSL 2, a memlock quota) everything stays pageable, with one warning: the same results, without overlap."""
from __future__ import annotations

import ctypes
import mmap
import warnings

import torch

PAGE = mmap.PAGESIZE


def host_register(ptr: int, nbytes: int) -> int:
    """Page-lock host memory for the copy engines of every device (cudaHostRegister, flag cudaHostRegisterPortable);
    returns the CUDA error code. `torch.cuda.cudart()` initialises CUDA first."""
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))


def host_unregister(ptr: int) -> int:
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


# cudaHostRegister's refusals that mean "this machine will not lock that much" (WSL 2 limits pinned memory, a
# container its locked-memory quota); the slab then stays pageable: copies still right, but they stall the host
PAGEABLE_FALLBACK = {2: "cudaErrorMemoryAllocation", 801: "cudaErrorNotSupported"}


def cudart_libraries(maps: str) -> list[str]:
    """Paths of the CUDA runtime libraries mapped into a process, from its /proc/<pid>/maps text."""
    paths = (line.split(maxsplit=5)[-1].strip() for line in maps.splitlines() if "libcudart" in line)
    return list(dict.fromkeys(p for p in paths if p.startswith("/")))


def clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a refused call. torch's binding returns cudaHostRegister's code
    but leaves the error set, and torch checks `cudaGetLastError` after its kernel launches: the refusal would be
    raised later, at some unrelated kernel. Where the runtime cannot be found (statically linked, no /proc), this
    does nothing."""
    try:
        with open("/proc/self/maps") as f:
            paths = cudart_libraries(f.read())
    except OSError:
        return
    for path in paths:
        try:
            ctypes.CDLL(path).cudaGetLastError()
        except (OSError, AttributeError):
            pass


_pinning_refused = False


def _pinned_or_pageable(pinned, pageable) -> torch.Tensor:
    """`pinned()` until the machine refuses to page-lock more host memory (torch's pinned allocator raises, and its
    check clears CUDA's last error), then `pageable()`, with one warning: copies are synchronous, results the same."""
    global _pinning_refused
    if not _pinning_refused:
        try:
            return pinned()
        except RuntimeError as e:
            _pinning_refused = True
            warnings.warn(f"could not page-lock more host memory ({str(e).splitlines()[0]}); keeping activations "
                          "and cached rows in pageable memory: the results are the same, but their copies stop "
                          "overlapping compute. On WSL 2 pinned memory is limited", RuntimeWarning, stacklevel=3)
    return pageable()


def page_locked(t: torch.Tensor) -> torch.Tensor:
    """`t` copied into page-locked host memory (a copy to the device from it overlaps compute), or `t` itself."""
    return _pinned_or_pageable(t.pin_memory, lambda: t)


def page_locked_empty(shape, dtype) -> torch.Tensor:
    """An empty host tensor, page-locked where the machine still allows it."""
    return _pinned_or_pageable(lambda: torch.empty(shape, dtype=dtype, pin_memory=True),
                               lambda: torch.empty(shape, dtype=dtype))


class HostSlab:
    """Host memory of one streamer's own: an anonymous mmap, page-aligned and spanning whole pages that nothing
    else shares, viewed as `tensor` (uint8, exactly `nbytes` long). `pin()` page-locks all its pages; `unpin()`
    must come before the memory can go, so a slab still pinned when it is collected unpins itself first (the
    mapping is freed only after this object and every view into it are gone)."""

    def __init__(self, nbytes: int, device: torch.device | None = None):
        self.nbytes, self.device = nbytes, device       # the device its copies go to
        self.mapped = -(-nbytes // PAGE) * PAGE
        self._map = mmap.mmap(-1, self.mapped) if self.mapped else None
        whole = torch.frombuffer(self._map, dtype=torch.uint8) if self._map else torch.empty(0, dtype=torch.uint8)
        self.tensor = whole[:nbytes]
        self.pinned = False

    def pin(self) -> None:
        """Page-lock the slab. Where the machine refuses to lock that much (PAGEABLE_FALLBACK), warn and keep it
        pageable; any other refusal is a fault and raises."""
        if self.pinned or not self.mapped:
            return
        code = host_register(self.tensor.data_ptr(), self.mapped)
        if code == 0:
            self.pinned = True
            return
        clear_cuda_error()
        if code not in PAGEABLE_FALLBACK:
            _check_cuda(code, "cudaHostRegister")
        warnings.warn(f"could not page-lock {self.mapped / 2**30:.2f} GiB of host memory for streamed layers "
                      f"(cudaHostRegister: {PAGEABLE_FALLBACK[code]}); streaming from pageable memory instead: "
                      "the results are the same, but copies no longer overlap compute. On WSL 2 pinned memory "
                      "is limited; a larger --gpu-mem streams less", RuntimeWarning, stacklevel=2)

    def unpin(self) -> None:
        if self.pinned:
            self.pinned = False
            code = host_unregister(self.tensor.data_ptr())
            if code:
                clear_cuda_error()
            _check_cuda(code, "cudaHostUnregister")

    def __del__(self):
        try:
            if self.pinned and torch.cuda.is_initialized():     # a copy from it may still be queued (a streamer
                torch.cuda.synchronize(self.device)             # never detached)
            self.unpin()
        except Exception:       # at interpreter exit CUDA may be gone already; the process frees it then
            pass


def _check_cuda(code, what: str) -> None:
    if int(code) != 0:
        raise RuntimeError(f"{what} failed with CUDA error {int(code)}")
