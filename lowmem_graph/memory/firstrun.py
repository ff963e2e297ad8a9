"""A plan's first run: what a node not yet in the node cache costs once, before the first step. Its checkpoint is
downloaded (a hub id whose weights are not in the hub cache), read once and quantised to NF4 module by module on
the run's device (quantise.py); later runs load the saved copy. `plan` and a run's plan print add it as one line.

Download: the checkpoint's bytes at DOWNLOAD_BYTES_PER_S, an assumption (the user's link is not measured); 0 for
local files. Reading: the checkpoint's bytes at the profile's disk rate. Quantisation: the linear weights at the
profile's `nf4_quantise` rate (devices.py: derived for the built-in GPUs, measured by bench/calibrate.py).
Nothing is downloaded or built to find this out: sizes come from the configs (shipped for the presets).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DOWNLOAD_BYTES_PER_S = 50e6     # an assumed 400 Mbit/s link to the hub
_WEIGHTS = ("model.safetensors.index.json", "model.safetensors")


@dataclass(frozen=True)
class Pending:
    """One node's first-run work: bytes still to download, checkpoint bytes read, linear weights quantised."""
    node: str
    download: int
    read: int
    weights: int


def seconds(device, pending: list[Pending]) -> dict[str, float | None]:
    """Seconds of each part on `device` (a DeviceProfile); quantisation None when the profile has no rate."""
    weights = sum(p.weights for p in pending)
    return {"download": sum(p.download for p in pending) / DOWNLOAD_BYTES_PER_S,
            "read": sum(p.read for p in pending) / device.disk_read,
            "quantise": weights / device.nf4_quantise if device.nf4_quantise else (None if weights else 0.0)}


def _local_folder(ref: str) -> Path | None:
    """The folder a local model reference names, if it is there; never built or converted here."""
    from ..files import file_sha256
    from ..loading import llama2c_folder
    from ..tiny import tiny_folder

    if ref.startswith("tiny:"):
        folder = tiny_folder(ref[len("tiny:"):])
    elif (path := Path(ref).expanduser()).is_file():      # llama2c: its converted folder
        folder = llama2c_folder(path, file_sha256(path))
    else:
        folder = path
    return folder if (folder / "config.json").is_file() else None


def _is_local(ref: str) -> bool:
    return ref.startswith("tiny:") or Path(ref).expanduser().exists()


def node_pending(node, compute: torch.dtype) -> Pending | None:
    """`node`'s first-run work (a NodeSpec quantised to NF4), None when its copy is in the node cache, or when its
    checkpoint is quantised already (bnb, GPTQ: FrozenNode.load loads it as it is, and caches nothing)."""
    from ..files import SEAL
    from ..loading import _quantised_cache_dir, decoder_parts, hub_commit, meta_model, source_identity

    config, model = meta_model(node.model, node.revision, node.trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        return None
    params = sum(p.numel() for p in model.parameters())
    _, layers, _ = decoder_parts(model)
    weights = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    read = params * (4 if str(dtype).endswith("float32") else 2)
    files = None
    if _is_local(node.model):
        folder = _local_folder(node.model)
        identity = source_identity(str(folder), True) if folder is not None else None
        source, download = str(folder), 0
        if folder is not None:
            files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    else:
        from huggingface_hub import try_to_load_from_cache

        commit = hub_commit(node.model, node.revision)
        identity = source_identity(node.model, False, commit) if commit else None
        source, download = node.model, read
        cached = [try_to_load_from_cache(node.model, name, revision=commit) for name in _WEIGHTS] if commit else []
        if any(isinstance(c, str) for c in cached):
            download = 0            # the weights are in the hub cache (a complete download is not checked here)
    if identity is not None and (_quantised_cache_dir(identity, source, "nf4", compute) / SEAL).is_file():
        return None
    if files:
        read = sum(p.stat().st_size for p in files)
    return Pending(node.name, download, read, weights)


def pending(spec, compute: torch.dtype) -> list[Pending]:
    """The nodes of `spec` quantised to NF4 whose copy is not in the node cache yet."""
    out = []
    for node in spec.nodes:
        if (node.quant or spec.quant) == "nf4" and (found := node_pending(node, compute)) is not None:
            out.append(found)
    return out


def _span(seconds: float) -> str:
    from .report import _ms

    return f"{seconds / 60:,.0f} min" if seconds >= 120 else _ms(seconds)


def format_first_run(spec, device, compute: torch.dtype) -> list[str]:
    """The one-off line `plan` prints for the nodes not yet quantised (nothing when every node is)."""
    todo = pending(spec, compute)
    if not todo:
        return []
    t = seconds(device, todo)
    download, read, weights = (sum(getattr(p, k) for p in todo) for k in ("download", "read", "weights"))
    parts = [f"download {download / 1e9:.2f} GB {_span(t['download'])} (at an assumed "
             f"{DOWNLOAD_BYTES_PER_S / 1e6:.0f} MB/s)"] if download else []
    parts.append(f"reading {read / 1e9:.2f} GB {_span(t['read'])}")
    parts.append(f"NF4 quantisation of {weights / 1e9:.2f} G weights " + (
        _span(t["quantise"]) if t["quantise"] is not None
        else "(no rate in this profile: bench/calibrate.py measures one)"))
    total = sum(v for v in t.values() if v is not None)
    return [f"first run (once, then cached): + {_span(total)} for {', '.join(p.node for p in todo)}, not yet in the "
            f"node cache: " + ", ".join(parts)]
