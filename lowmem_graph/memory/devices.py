"""Device profiles: what the cost model (memory/cost.py) needs to know of a machine to predict a plan's time.

Built-in profiles come from published figures (each line cites its spec sheet) turned into what a run achieves by
the derating factors below, and a conservative one for a CPU run that was never measured; `python bench/calibrate.py` measures the machine it runs on and writes a profile into
the cache root (`devices/<device>.json`), which every plan made for that device then uses (`find`). `plan
--profile NAME|FILE` picks one by hand.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

# --- from a spec sheet to what a run achieves (each one line of why) ---------------------------------------------
PCIE_GBS = {3: 15.75, 4: 31.5, 5: 63.0}   # x16 link, GB/s each way (PCI-SIG: 8/16/32 GT/s, 128b/130b encoding).
PCIE_PINNED = 0.8          # pinned cudaMemcpy reaches ~25 of gen 4's 31.5 GB/s (NVIDIA bandwidthTest, typical).
PCIE_PAGEABLE = 0.4        # pageable copies stage through a driver buffer: about half the pinned rate.
GEMM_REACH = 0.6           # cuBLAS on LLM-shaped bf16 GEMMs (a few thousand tokens x 4096) reaches ~60% of peak.
DEQUANT_BYTES = 2.5        # NF4 -> bf16 dequantisation moves 0.5 B in and 2 B out per weight: memory bound,
DEQUANT_REACH = 0.5        # at about half the memory bandwidth (bitsandbytes' kernel, small weights).
LAUNCH_GPU = 3e-4          # seconds per decoder layer run: ~30 kernels x ~5 us launch + the hooks' Python.
NVME_GBS = 3.0             # disk: a PCIe 4.0 NVMe SSD's sequential read, derated (no spec sheet: the host's).
QUANTISE_BYTES = 2.5       # a first run's NF4 quantisation there: each bf16 weight crosses PCIe (2 B, pageable) and
                           # its packed NF4 comes back (0.5 B); bitsandbytes' kernel, memory bound, is ~40x faster.


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    h2d_pinned: float          # host-to-device bytes/s from page-locked memory (the streamers' slabs)
    h2d_pageable: float        # ... from ordinary memory
    gemm: dict                 # FLOP/s of a large matmul, by compute dtype ("bf16", "fp32")
    nf4_dequant: float         # weights/s dequantised NF4 -> the compute dtype
    launch: float              # seconds of fixed cost per decoder layer run (kernel launches, Python)
    disk_read: float           # bytes/s
    memory: float              # device memory bandwidth, bytes/s (optimizer step, elementwise work)
    compute_dtype: str = "bf16"     # what the nodes compute in there (CPU: fp32)
    copies_overlap: bool = True     # copies on a side stream hide behind compute (CUDA); on a CPU they add
    source: str = ""
    nf4_quantise: float = 0.0       # weights/s quantised to NF4 there on a first run (quantise.py); 0: not known
    # seconds a checkpointed layer adds per step and micro-batch beyond its runs' launches: our hook registry's
    # dispatch and the group's checkpoint (bench/calibrate.py measures it; the built-in cards count it in `launch`)
    hooks: float = 0.0
    origin: str = ""                # the file it was read from ('' for a built-in one); never written into one

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "origin"}


def published(name: str, tflops_bf16: float, tflops_fp32: float, memory_gbs: float, pcie_gen: int,
              source: str) -> DeviceProfile:
    """A profile from spec-sheet figures: dense BF16 tensor TFLOPS, FP32 TFLOPS, memory GB/s, PCIe generation."""
    link = PCIE_GBS[pcie_gen] * 1e9
    return DeviceProfile(name, link * PCIE_PINNED, link * PCIE_PAGEABLE,
                         {"bf16": tflops_bf16 * 1e12 * GEMM_REACH, "fp32": tflops_fp32 * 1e12 * GEMM_REACH},
                         memory_gbs * 1e9 * DEQUANT_REACH / DEQUANT_BYTES, LAUNCH_GPU, NVME_GBS * 1e9,
                         memory_gbs * 1e9, source=source, nf4_quantise=link * PCIE_PAGEABLE / QUANTISE_BYTES)


BUILT_IN = {p.name: p for p in (
    published("rtx3090", 71, 35.6, 936, 4, "NVIDIA Ampere GA102 whitepaper: BF16 tensor (FP32 accumulate) 71 TFLOPS "
              "dense, FP32 35.6, GDDR6X 936 GB/s, PCIe 4.0 x16"),
    published("rtx4090", 165.2, 82.6, 1008, 4, "NVIDIA Ada Lovelace whitepaper: BF16 tensor (FP32 accumulate) 165.2 "
              "TFLOPS dense, FP32 82.6, GDDR6X 1008 GB/s, PCIe 4.0 x16"),
    published("rtx5090", 209.5, 104.8, 1792, 5, "NVIDIA RTX Blackwell whitepaper: BF16 tensor (FP32 accumulate) "
              "209.5 TFLOPS dense, FP32 104.8, GDDR7 1792 GB/s, PCIe 5.0 x16"),
    published("a100-40gb", 312, 19.5, 1555, 4, "NVIDIA A100 datasheet: BF16 tensor 312 TFLOPS dense, FP32 19.5, "
              "HBM2 1555 GB/s, PCIe 4.0 x16"),
    published("a100-80gb", 312, 19.5, 2039, 4, "NVIDIA A100 datasheet (SXM): BF16 tensor 312 TFLOPS dense, FP32 "
              "19.5, HBM2e 2039 GB/s, PCIe 4.0 x16"),
    published("l4", 121, 30.3, 300, 4, "NVIDIA L4 datasheet: BF16 tensor 242 TFLOPS with sparsity (121 dense), "
              "FP32 30.3, GDDR6 300 GB/s, PCIe 4.0 x16"),
    published("h100", 989, 67, 3350, 5, "NVIDIA H100 datasheet (SXM): BF16 tensor 1979 TFLOPS with sparsity (989 "
              "dense), FP32 67, HBM3 3.35 TB/s, PCIe 5.0 x16"),
    published("h100-pcie", 756, 51, 2000, 5, "NVIDIA H100 datasheet (PCIe): BF16 tensor 1513 TFLOPS with sparsity "
              "(756 dense), FP32 51, HBM2e 2 TB/s, PCIe 5.0 x16"),
    published("h200", 989, 67, 4800, 5, "NVIDIA H200 datasheet (SXM): BF16 tensor 1979 TFLOPS with sparsity (989 "
              "dense), FP32 67, HBM3e 4.8 TB/s, PCIe 5.0 x16"),
)}
# A CPU with no measured profile: figures at or below what one core of a current x86 machine gives torch, so that a
# CPU run is never priced as faster than it is (fp32 compute; a copy is a memory copy, and adds to compute).
BUILT_IN["cpu"] = DeviceProfile(
    "cpu", 4e9, 4e9, {"fp32": 5e10, "bf16": 5e10}, 1e9, 4e-4, 5e8, 1e10, compute_dtype="fp32", copies_overlap=False,
    nf4_quantise=2e7,
    source="built-in conservative CPU profile (bench/calibrate.py measures this machine's): fp32 GEMM 50 GFLOPS, "
           "about half one AVX2 core's peak (2 FMA units x 8 fp32 lanes x 2 FLOP x 3 GHz = 96 GFLOPS); copies 4 GB/s "
           "and memory 10 GB/s, below one core's share of a DDR4-3200 channel (25.6 GB/s); disk 0.5 GB/s, below a "
           "SATA III SSD (6 Gb/s, 8b/10b: 600 MB/s); NF4 dequantisation 1 G weights/s and 400 us per layer run, "
           "about a quarter and twice what bench/calibrate.py measured on one thread of a 2-core Xeon "
           "(bench/results/plan-time-cpu.md: 3.72 G weights/s, 192 us; 0.198 TFLOPS fp32, 6.3 GB/s copies); NF4 "
           "quantisation 20 M weights/s, below the 29 M/s of a 574M-parameter first run there, loading included "
           "(bench/results/quantise-cpu.md)")
# a CUDA card's name -> its built-in profile (first match)
CARDS = ((r"RTX 3090", "rtx3090"), (r"RTX 4090", "rtx4090"), (r"RTX 5090", "rtx5090"), (r"A100.*80", "a100-80gb"),
         (r"A100", "a100-40gb"), (r"\bL4\b", "l4"), (r"H100.*PCIe", "h100-pcie"), (r"H100", "h100"),
         (r"H200", "h200"))
DEFAULT = "rtx4090"     # no measured profile and no known card: plan for the common 24 GB card


def slug(device_name: str) -> str:
    """A file name for a device: 'NVIDIA GeForce RTX 4090' -> 'nvidia-geforce-rtx-4090'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def profiles_dir() -> Path:
    """Measured profiles live in the cache root (LOWMEM_GRAPH_CACHE, as the tiny models and the nodes do)."""
    from ..tiny import cache_root

    return cache_root() / "devices"


def device_name(device: str) -> str:
    """The name a measured profile of `device` is filed under: the CUDA card's name, or 'cpu'."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = int(device.partition(":")[2] or 0)
            if index < torch.cuda.device_count():
                return torch.cuda.get_device_name(index)
        return ""
    return "cpu"


def load(path: str | Path) -> DeviceProfile:
    try:
        data = json.loads(Path(path).read_text())
        return DeviceProfile(**{**data, "origin": str(path)})
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot read device profile {path}: {e}") from None


def save(profile: DeviceProfile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    os.replace(temporary, path)     # never a half-written profile
    return path


def resolve(name: str | None, device: str = "cuda:0") -> DeviceProfile:
    """`--profile`: a built-in name or a JSON file; None: the measured profile of `device` in the cache root, else
    on a CPU the built-in 'cpu', else the built-in one the card's name matches (e.g. 'NVIDIA GeForce RTX 4090' ->
    rtx4090), else DEFAULT."""
    if name is not None:
        if name.lower() in BUILT_IN:
            return BUILT_IN[name.lower()]
        if Path(name).is_file():
            return load(name)
        raise UserError(f"--profile {name}: neither a built-in profile ({', '.join(BUILT_IN)}) nor a file "
                        "(bench/calibrate.py writes one)")
    found = device_name(device)
    if found and (profiles_dir() / f"{slug(found)}.json").is_file():
        return load(profiles_dir() / f"{slug(found)}.json")
    if not device.startswith("cuda"):
        return BUILT_IN["cpu"]
    for pattern, key in CARDS:
        if re.search(pattern, found, re.IGNORECASE):
            return BUILT_IN[key]
    return BUILT_IN[DEFAULT]
