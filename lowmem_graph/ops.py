"""The injection op: project K readers into the shared latent, average, carry into a refiner, blend.

`fused_inject` is the one entry point the graph calls at every injection site. It picks the fused
Triton kernel on CUDA and the PyTorch reference elsewhere; LOWMEM_GRAPH_INJECT=triton|torch forces one.
"""
from __future__ import annotations

import functools
import os

import torch

from lowmem_graph.errors import UserError


def inject_reference(h, xs, weights, carry, blend: float, eps: float = 1e-6):
    """out = (1-a) h + a * u_hat * ||h||, u = carry(mean_k W_k x_k), u_hat = u / ||u||.

    h: (B, T, D) residual stream. xs: K frozen reader states, each (B, d_k) (pooled: one vector per
    example, broadcast over tokens) or (B, T, d_k) (per-token). weights: K matrices (L, d_k).
    carry: (D, L). Math in fp32, result in h's dtype.
    """
    with torch.autocast(h.device.type, enabled=False):     # fp32 also inside a training step's autocast
        z = sum(x.float() @ w.float().t() for x, w in zip(xs, weights)) / len(xs)
        u = z @ carry.float().t()
        u_hat = u / u.norm(dim=-1, keepdim=True).clamp_min(eps)
        if u_hat.dim() == 2:
            u_hat = u_hat[:, None, :]
        hf = h.float()
        out = (1.0 - blend) * hf + blend * u_hat * hf.norm(dim=-1, keepdim=True)
    return out.to(h.dtype)


@functools.cache
def _triton_importable() -> bool:
    """Whether triton is installed. Our kernels' own import errors propagate: a broken install must not fall
    back to the reference quietly (and make every timing on a GPU a timing of the wrong path)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import lowmem_graph.kernels.inject  # noqa: F401
    return True


def inject_backend(h) -> str:
    """"triton" or "torch" for this h: LOWMEM_GRAPH_INJECT=triton|torch|auto (default auto: Triton on CUDA)."""
    mode = os.environ.get("LOWMEM_GRAPH_INJECT", "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "torch"):
        raise UserError(f"LOWMEM_GRAPH_INJECT={mode!r}: expected triton, torch or auto")
    if mode == "triton" and not _triton_importable():
        raise UserError("LOWMEM_GRAPH_INJECT=triton but triton is not installed (pip install triton)")
    if mode == "auto":
        return "triton" if h.is_cuda and _triton_importable() else "torch"
    return mode


def fused_inject(h, xs, weights, carry, blend: float):
    """Dispatch: Triton on CUDA, the PyTorch reference elsewhere (override: LOWMEM_GRAPH_INJECT)."""
    if inject_backend(h) == "triton":
        from lowmem_graph.kernels.inject import fused_inject_triton

        return fused_inject_triton(h, xs, weights, carry, blend)
    return inject_reference(h, xs, weights, carry, blend)
