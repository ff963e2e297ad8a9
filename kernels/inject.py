"""Triton kernels for the injection op; `lowmem_graph.ops.inject_reference` defines the math.

Rows r are examples (pooled readers, u broadcast over the T tokens of an example) or tokens (per-token).

Forward
  z = (1/K) sum_k x_k W_k^T   `_gemm_kernel`: up to 3 readers per launch share one fp32 accumulator, so no
                              per-reader (rows, L) latent is written; z (rows, L) fp32 is kept for backward.
  u = z P^T                   `_gemm_kernel`, fp32 output.
  out = blend(h, u)           `_blend_fwd_kernel`: one program per h row holds the whole row of h and u in
                              registers, so norms, blend and the single cast cost one read of h, one write of out.
Backward
  u is recomputed (one GEMM) instead of keeping a (rows, D) fp32 tensor alive per site until backward.
  `_blend_bwd_kernel` writes dh and du (in place over u); `_gemm_kernel` then gives dz = du P, dP = du^T z and
  dW_k = (1/K) dz^T x_k. dx_k is not computed: readers are frozen.

Why the blend is not fused into the carry GEMM: it needs ||u|| over all of D before it can write any element,
and a GEMM tile holds only part of a row. Fusing means recomputing u (doubling the largest GEMM, 2*rows*D*L
flops) or holding BLOCK_M x D fp32 accumulators (more than the register file for D >= 2048). Writing u once
in fp32 and reading it back costs 8 bytes per element, less than the recompute at L = 1024; pooled, u is (B, D).

Why no cuBLAS: every GEMM here mixes dtypes (fp32 z, du, dz against 16-bit reader states or weights), and
torch.matmul would need fp32 copies of the 16-bit operands, for x_k a full (rows, d_k) copy per reader.
`_gemm_kernel` loads each operand in its own dtype and converts in registers. Same-dtype 16-bit pairs use
16-bit tensor-core dots; anything with fp32 uses fp32 dots, TF32 unless
torch.get_float32_matmul_precision() is "highest" (torch's default), matching torch.matmul.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter computes bf16 dots wrongly; there bf16 tiles are upcast to fp32 first.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_PAIRS_PER_LAUNCH = 3


@triton.jit
def _mma(acc, a_ptr, b_ptr, K, sam, sak, sbk, sbn, offs_m, offs_n, M, N,
         BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a[offs_m, :K] @ b[:K, offs_n]."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * sam + offs_k[None, :] * sak
    b_ptrs = b_ptr + offs_k[:, None] * sbk + offs_n[None, :] * sbn
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    return acc


@triton.jit
def _gemm_kernel(c_ptr, M, N, scm, scn, scale,
                 a0, b0, K0, sa0m, sa0k, sb0k, sb0n,
                 a1, b1, K1, sa1m, sa1k, sb1k, sb1n,
                 a2, b2, K2, sa2m, sa2k, sb2k, sb2n,
                 PAIRS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """c = scale * sum_{i < PAIRS} a_i @ b_i with one fp32 accumulator; cast once on store."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _mma(acc, a0, b0, K0, sa0m, sa0k, sb0k, sb0n, offs_m, offs_n, M, N, BLOCK_K, DOT_FP32, PRECISION)
    if PAIRS > 1:
        acc = _mma(acc, a1, b1, K1, sa1m, sa1k, sb1k, sb1n, offs_m, offs_n, M, N, BLOCK_K, DOT_FP32, PRECISION)
    if PAIRS > 2:
        acc = _mma(acc, a2, b2, K2, sa2m, sa2k, sb2k, sb2n, offs_m, offs_n, M, N, BLOCK_K, DOT_FP32, PRECISION)
    c_ptrs = c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, (acc * scale).to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _blend_fwd_kernel(out_ptr, h_ptr, u_ptr, tokens_per_u, D, s_out, s_h, s_u, blend, eps,
                      BLOCK_D: tl.constexpr):
    """out = (1-a) h + a * u/||u|| * ||h|| for one h row; u row = h row // tokens_per_u."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    h = tl.load(h_ptr + row * s_h + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + (row // tokens_per_u) * s_u + cols, mask=mask, other=0.0)
    norm_h = tl.sqrt(tl.sum(h * h, axis=0))
    norm_u = tl.maximum(tl.sqrt(tl.sum(u * u, axis=0)), eps)
    out = (1.0 - blend) * h + u * (blend * norm_h / norm_u)
    tl.store(out_ptr + row * s_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _blend_bwd_kernel(dh_ptr, du_ptr, dy_ptr, h_ptr, u_ptr, tokens_per_u, tokens_per_prog, D,
                      s_dh, s_dy, s_h, s_u, blend, eps, HAS_DH: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (r, s): tokens [s*tokens_per_prog, ...) of u row r; writes their dh and their summed du.

    With du_ptr = u_ptr and one split per u row this overwrites u in place: the program owns that row.
    """
    urow = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    u = tl.load(u_ptr + urow * s_u + cols, mask=mask, other=0.0)
    norm_u_raw = tl.sqrt(tl.sum(u * u, axis=0))
    norm_u = tl.maximum(norm_u_raw, eps)
    u_hat = u / norm_u
    # clamp_min(eps) passes no gradient to ||u|| where it clamped.
    unclamped = (norm_u_raw >= eps).to(tl.float32)
    du = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t0 = split * tokens_per_prog
    for t in range(t0, tl.minimum(t0 + tokens_per_prog, tokens_per_u)):
        row = urow * tokens_per_u + t
        dy = tl.load(dy_ptr + row * s_dy + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + row * s_h + cols, mask=mask, other=0.0).to(tl.float32)
        norm_h = tl.sqrt(tl.sum(h * h, axis=0))
        dy_u = tl.sum(dy * u_hat, axis=0)
        if HAS_DH:
            # d||h||/dh = h/||h||, taken as 0 at h = 0 like torch: any finite divisor gives that.
            dh = (1.0 - blend) * dy + (blend * dy_u / tl.where(norm_h > 0, norm_h, 1.0)) * h
            tl.store(dh_ptr + row * s_dh + cols, dh.to(dh_ptr.dtype.element_ty), mask=mask)
        du += (blend * norm_h / norm_u) * (dy - unclamped * dy_u * u_hat)
    tl.store(du_ptr + (urow * tl.num_programs(1) + split) * D + cols, du, mask=mask)


def _gemm(pairs, out_dtype, scale=1.0):
    """scale * sum_i a_i @ b_i for 2-D tensors of any strides and dtypes, fp32 accumulation, one kernel per 3 pairs."""
    M, N = pairs[0][0].shape[0], pairs[0][1].shape[1]
    device = pairs[0][0].device
    dtypes = {t.dtype for pair in pairs for t in pair}
    dot_fp32 = len(dtypes) > 1 or torch.float32 in dtypes or (_INTERPRET and torch.bfloat16 in dtypes)
    precision = "ieee" if dot_fp32 and torch.get_float32_matmul_precision() == "highest" else "tf32"
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    block_n = min(64, max(16, triton.next_power_of_2(N)))
    block_k = min(32, max(16, triton.next_power_of_2(max(a.shape[1] for a, _ in pairs))))
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    out = None
    for start in range(0, len(pairs), _PAIRS_PER_LAUNCH):
        chunk = pairs[start:start + _PAIRS_PER_LAUNCH]
        part = torch.empty(M, N, device=device, dtype=out_dtype)
        args = []
        for a, b in chunk + [chunk[0]] * (_PAIRS_PER_LAUNCH - len(chunk)):
            args += [a, b, a.shape[1], a.stride(0), a.stride(1), b.stride(0), b.stride(1)]
        _gemm_kernel[grid](part, M, N, part.stride(0), part.stride(1), scale, *args,
                           PAIRS=len(chunk), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                           DOT_FP32=dot_fp32, PRECISION=precision, num_warps=4, num_stages=3)
        out = part if out is None else out.add_(part)
    return out


def _row_settings(D):
    """Whole-row block and warps, as Liger-Kernel's calculate_settings."""
    block = triton.next_power_of_2(D)
    if block > 65536:
        raise ValueError(f"fused inject: width {D} is too large for one row per program")
    return block, 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def _rows(t):
    """2-D (rows, width) view with unit column stride, copying only if needed."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(h, xs, weights, carry):
    if not (_INTERPRET or h.is_cuda):
        raise ValueError("fused inject: Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before import")
    if h.dim() != 3:
        raise ValueError(f"fused inject: h must be (B, T, D), got {tuple(h.shape)}")
    if not xs or len(xs) != len(weights):
        raise ValueError(f"fused inject: need one weight per reader, got {len(xs)} readers, {len(weights)} weights")
    B, T, D = h.shape
    L = carry.shape[1]
    if tuple(carry.shape) != (D, L):
        raise ValueError(f"fused inject: carry must be (D={D}, L), got {tuple(carry.shape)}")
    lead = xs[0].shape[:-1]
    if lead not in ((B,), (B, T)):
        raise ValueError(f"fused inject: readers must be (B, d) or (B, T, d), got {tuple(xs[0].shape)}")
    for k, (x, w) in enumerate(zip(xs, weights)):
        if x.shape[:-1] != lead or tuple(w.shape) != (L, x.shape[-1]):
            raise ValueError(f"fused inject: reader {k} is {tuple(x.shape)} with weight {tuple(w.shape)}; "
                             f"expected {tuple(lead)} + (d,) and (L={L}, d)")
        if x.requires_grad:
            raise ValueError(f"fused inject: reader {k} requires grad, but readers are frozen (no dx is computed)")
    if any(t.device != h.device for t in (carry, *xs, *weights)):
        raise ValueError("fused inject: all tensors must be on one device")


class FusedInject(torch.autograd.Function):
    """Autograd wrapper; readers and weights come flattened as *tensors = (x_1..x_K, W_1..W_K)."""

    @staticmethod
    def forward(ctx, h, carry, blend, eps, *tensors):
        K = len(tensors) // 2
        xs, weights = tensors[:K], tensors[K:]
        B, T, D = h.shape
        x_rows = [_rows(x) for x in xs]
        z = _gemm([(x, w.t()) for x, w in zip(x_rows, weights)], torch.float32, 1.0 / K)
        u = _gemm([(z, carry.t())], torch.float32)
        h2 = _rows(h)
        out = torch.empty((B * T, D), device=h.device, dtype=h.dtype)
        block_d, warps = _row_settings(D)
        _blend_fwd_kernel[(B * T,)](out, h2, u, (B * T) // u.shape[0], D, out.stride(0), h2.stride(0),
                                    u.stride(0), blend, eps, BLOCK_D=block_d, num_warps=warps)
        ctx.save_for_backward(h, z, carry, *x_rows, *weights)
        ctx.blend, ctx.eps = blend, eps
        return out.view(B, T, D)

    @staticmethod
    def backward(ctx, dy):
        h, z, carry, *rest = ctx.saved_tensors
        K = len(rest) // 2
        x_rows, weights = rest[:K], rest[K:]
        B, T, D = h.shape
        n_rows = z.shape[0]
        tokens_per_u = (B * T) // n_rows
        u = _gemm([(z, carry.t())], torch.float32)
        h2, dy2 = _rows(h), _rows(dy)
        need_dh = ctx.needs_input_grad[0]
        dh = torch.empty((B * T, D), device=h.device, dtype=h.dtype) if need_dh else h2  # h2: unused pointer
        # Pooled rows cover T tokens each: split them so enough programs run, then sum the splits.
        target = 4 * torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 4
        per_prog = triton.cdiv(tokens_per_u, min(tokens_per_u, max(1, target // n_rows)))
        splits = triton.cdiv(tokens_per_u, per_prog)
        du = u if splits == 1 else torch.empty((n_rows, splits, D), device=u.device, dtype=torch.float32)
        block_d, warps = _row_settings(D)
        _blend_bwd_kernel[(n_rows, splits)](dh, du, dy2, h2, u, tokens_per_u, per_prog, D, dh.stride(0),
                                            dy2.stride(0), h2.stride(0), u.stride(0), ctx.blend, ctx.eps,
                                            HAS_DH=need_dh, BLOCK_D=block_d, num_warps=warps)
        if splits > 1:
            du = du.sum(dim=1)
        d_carry = _gemm([(du.t(), z)], carry.dtype) if ctx.needs_input_grad[1] else None
        d_weights = [None] * K
        if any(ctx.needs_input_grad[4 + K:]):
            dz = _gemm([(du, carry)], torch.float32)
            d_weights = [_gemm([(dz.t(), x)], w.dtype, 1.0 / K) if need else None
                         for x, w, need in zip(x_rows, weights, ctx.needs_input_grad[4 + K:])]
        return (dh.view(B, T, D) if need_dh else None, d_carry, None, None, *[None] * K, *d_weights)


def fused_inject_triton(h, xs, weights, carry, blend: float, eps: float = 1e-6):
    """Triton version of `inject_reference` (same arguments and result); gives no gradient to the readers xs."""
    xs, weights = list(xs), list(weights)
    _check(h, xs, weights, carry)
    return FusedInject.apply(h, carry, float(blend), float(eps), *xs, *weights)
