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
  `_blend_bwd_kernel` writes dh and du (in place over u); `_gemm_kernel` then gives dz = du P, dP = du^T z,
  dW_k = (1/K) dz^T x_k, and dx_k = (1/K) dz W_k only where a reader needs it (a latent written into a model
  upstream, in an edge graph; frozen readers do not).

Why the blend is not fused into the carry GEMM: it needs ||u|| over all of D before it can write any element,
and a GEMM tile holds only part of a row. Fusing means recomputing u (doubling the largest GEMM, 2*rows*D*L
flops) or holding BLOCK_M x D fp32 accumulators (more than the register file for D >= 2048). Writing u once
in fp32 and reading it back costs 8 bytes per element, less than the recompute at L = 1024; pooled, u is (B, D).

Why not cuBLAS: every GEMM here mixes dtypes (fp32 z, du, dz against 16-bit reader states or weights), and
torch.matmul would need copies of the operands in one dtype, for x_k a full (rows, d_k) copy per reader.
`_gemm_kernel` loads each operand in its own dtype and converts in registers. `gemm="cublas"` runs the same op with
cuBLAS GEMMs around the same blend kernels, for the benchmark to compare (bench/kernel_bench.py).

Precision follows the output. With a 16-bit residual stream (bf16 autocast, every CUDA run) the GEMMs run on
tensor cores: same-dtype 16-bit pairs as 16-bit dots, anything with fp32 as TF32 dots, all accumulating in fp32;
TF32 keeps 10 mantissa bits, as many as fp16's and more than bf16's 7, which the result is rounded to. With an fp32 stream fp32 dots follow
torch.get_float32_matmul_precision(): IEEE under "highest" (torch's default), TF32 otherwise, as torch.matmul does.

Tiles: on CUDA, GEMMs of at least `_TUNE_MIN_FLOPS` are autotuned over a few tile shapes (keyed by N, the K's,
the dtypes, the dot settings and M rounded up to a power of two, so per-token batches of new lengths do not tune
again); smaller ones and the interpreter (which cannot autotune) take one tile sized to the shape.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
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
def _gemm_kernel(c_ptr, M, N, scm, scn, scale, m_bucket,
                 a0, b0, K0, sa0m, sa0k, sb0k, sb0n,
                 a1, b1, K1, sa1m, sa1k, sb1k, sb1n,
                 a2, b2, K2, sa2m, sa2k, sb2k, sb2n,
                 PAIRS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """c = scale * sum_{i < PAIRS} a_i @ b_i with one fp32 accumulator; cast once on store. Writes every element
    of c once and reads nothing it writes, so the autotuner may run it again. m_bucket is only the tuning key."""
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


_TUNE_MIN_FLOPS = 2 ** 30          # below this a GEMM takes microseconds: compiling its tiles would cost more
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): few rows (pooled), then three for the per-token GEMMs. Each tile is
# compiled once per dtype combination, so the list stays short: the first step pays for every compile. A tile's
# pipeline holds (stages - 1) x (BLOCK_M + BLOCK_N) x BLOCK_K operands in shared memory, 4 bytes each for fp32
# operands (compiled for sm_86, exactly that; sm_90's wgmma tiles hold `stages`, within its 227 KiB). Every tile fits
# an RTX 30xx/40xx's 99 KiB per block, where the autotuner would skip a tile that does not; the few-rows tile, the
# only candidate for 16 rows or fewer, fits 64 KiB (sm_75). The old (16, 128, 64, 4, 4) needed 108 KiB.
_TILES = ((16, 128, 32, 4, 4), (64, 64, 32, 4, 3), (128, 64, 32, 4, 4), (128, 128, 32, 8, 3))


def _pow2(n, low, high):
    return min(high, max(low, triton.next_power_of_2(n)))


def _fits(configs, named_args, **kwargs):
    """Autotuner pruning: tiles no larger than the shape (rounded up to a power of two); the smallest otherwise."""
    rows = _pow2(named_args["M"], 16, 1 << 30)
    cols = _pow2(named_args["N"], 16, 1 << 30)
    fit = [c for c in configs if c.kwargs["BLOCK_M"] <= rows and c.kwargs["BLOCK_N"] <= cols]
    return fit or configs[:1]


def tile_configs():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for m, n, k, w, st in _TILES]


def _time_tile(kernel_call, quantiles, repeats=10):
    """The autotuner's timing, without triton.testing.do_bench's 256 MB L2-flush buffer: that would land outside
    the memory plan, at the first step, when a budget is tightest. Median, p20, p80 ms of `repeats` calls queued
    back to back (one synchronisation at the end, so no call is timed from an idle GPU)."""
    kernel_call()                                        # compiles this tile
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        kernel_call()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return [times[int(q * (repeats - 1))] for q in quantiles]


@functools.cache
def _tuned_gemm_kernel():
    """`_gemm_kernel` under triton.autotune, or None where this Triton's autotune takes no timing function."""
    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        return None
    return triton.autotune(tile_configs(), key=["m_bucket", "N", "K0", "K1", "K2", "PAIRS", "DOT_FP32", "PRECISION"],
                           do_bench=_time_tile,
                           prune_configs_by={"early_config_prune": _fits})(_gemm_kernel)


def _autotuned(device, flops) -> bool:
    """CUDA only (the interpreter cannot autotune), and only GEMMs large enough to repay compiling the tiles."""
    return device.type == "cuda" and not _INTERPRET and flops >= _TUNE_MIN_FLOPS and _tuned_gemm_kernel() is not None


def dot_settings(dtypes, out_dtype) -> tuple[bool, str]:
    """(upcast tiles to fp32, tl.dot input_precision) for operands of these dtypes feeding a `out_dtype` result.

    A 16-bit result (the residual stream under bf16 autocast) takes tensor cores: 16-bit pairs as they are, anything
    with fp32 as TF32. An fp32 result follows torch's fp32 matmul precision. The interpreter's bf16 dots are wrong,
    so there bf16 is upcast too."""
    dot_fp32 = len(dtypes) > 1 or torch.float32 in dtypes or (_INTERPRET and torch.bfloat16 in dtypes)
    ieee = out_dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return dot_fp32, "ieee" if dot_fp32 and ieee else "tf32"


def _gemm(pairs, out_dtype, scale=1.0, result_dtype=torch.float32):
    """scale * sum_i a_i @ b_i for 2-D tensors of any strides and dtypes, fp32 accumulation, one kernel per 3 pairs.

    `result_dtype` is the dtype the op's output is finally rounded to (h's): it sets the dot precision."""
    M, N = pairs[0][0].shape[0], pairs[0][1].shape[1]
    device = pairs[0][0].device
    dot_fp32, precision = dot_settings({t.dtype for pair in pairs for t in pair}, result_dtype)
    k_max = max(a.shape[1] for a, _ in pairs)
    if _autotuned(device, 2 * M * N * k_max * len(pairs)):
        kernel, tiles = _tuned_gemm_kernel(), {}
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    else:
        tiles = {"BLOCK_M": _pow2(M, 16, 64), "BLOCK_N": _pow2(N, 16, 64), "BLOCK_K": _pow2(k_max, 16, 32),
                 "num_warps": 4, "num_stages": 3}
        kernel, grid = _gemm_kernel, (triton.cdiv(M, tiles["BLOCK_M"]), triton.cdiv(N, tiles["BLOCK_N"]))
    out = None
    for start in range(0, len(pairs), _PAIRS_PER_LAUNCH):
        chunk = pairs[start:start + _PAIRS_PER_LAUNCH]
        part = torch.empty(M, N, device=device, dtype=out_dtype)
        args = []
        for a, b in chunk + [chunk[0]] * (_PAIRS_PER_LAUNCH - len(chunk)):
            args += [a, b, a.shape[1], a.stride(0), a.stride(1), b.stride(0), b.stride(1)]
        kernel[grid](part, M, N, part.stride(0), part.stride(1), scale, _pow2(M, 16, 1 << 30), *args,
                     PAIRS=len(chunk), DOT_FP32=dot_fp32, PRECISION=precision, **tiles)
        out = part if out is None else out.add_(part)
    return out


def _gemm_cublas(pairs, out_dtype, scale=1.0, result_dtype=torch.float32):
    """`_gemm` through torch.matmul (cuBLAS), every operand cast to the result's dtype first, as autocast would: a
    16-bit result gets 16-bit GEMMs (cuBLAS's fastest, coarser than `_gemm`'s TF32 for fp32 operands), and the
    casts are the copies `_gemm` avoids."""
    out = sum(a.to(result_dtype) @ b.to(result_dtype) for a, b in pairs).float()
    return (out * scale if scale != 1.0 else out).to(out_dtype)


GEMMS = {"triton": _gemm, "cublas": _gemm_cublas}


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
    if any(t.device != h.device for t in (carry, *xs, *weights)):
        raise ValueError("fused inject: all tensors must be on one device")


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device and its stream: make that the tensors' own (a refiner placed on a
    second card computes there while the current device is the first)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class FusedInject(torch.autograd.Function):
    """Autograd wrapper; readers and weights come flattened as *tensors = (x_1..x_K, W_1..W_K)."""

    @staticmethod
    def forward(ctx, h, carry, blend, eps, gemm, *tensors):
        K = len(tensors) // 2
        xs, weights = tensors[:K], tensors[K:]
        B, T, D = h.shape
        x_rows = [_rows(x) for x in xs]
        gemm = functools.partial(GEMMS[gemm], result_dtype=h.dtype)
        z = gemm([(x, w.t()) for x, w in zip(x_rows, weights)], torch.float32, 1.0 / K)
        u = gemm([(z, carry.t())], torch.float32)
        h2 = _rows(h)
        out = torch.empty((B * T, D), device=h.device, dtype=h.dtype)
        block_d, warps = _row_settings(D)
        _blend_fwd_kernel[(B * T,)](out, h2, u, (B * T) // u.shape[0], D, out.stride(0), h2.stride(0),
                                    u.stride(0), blend, eps, BLOCK_D=block_d, num_warps=warps)
        ctx.save_for_backward(h, z, carry, *x_rows, *weights)
        ctx.blend, ctx.eps, ctx.gemm = blend, eps, gemm
        ctx.reader_shapes = [x.shape for x in xs]
        return out.view(B, T, D)

    @staticmethod
    def backward(ctx, dy):
        with _on_device(dy.device):     # autograd's worker for that device has set it already; said here too
            return FusedInject._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        h, z, carry, *rest = ctx.saved_tensors
        K = len(rest) // 2
        x_rows, weights = rest[:K], rest[K:]
        B, T, D = h.shape
        n_rows = z.shape[0]
        tokens_per_u = (B * T) // n_rows
        gemm = ctx.gemm
        u = gemm([(z, carry.t())], torch.float32)
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
        d_carry = gemm([(du.t(), z)], carry.dtype) if ctx.needs_input_grad[1] else None
        d_xs, d_weights = [None] * K, [None] * K
        if any(ctx.needs_input_grad[5:]):
            dz = gemm([(du, carry)], torch.float32)
            d_xs = [gemm([(dz, w)], x.dtype, 1.0 / K).view(shape) if need else None
                    for x, w, shape, need in zip(x_rows, weights, ctx.reader_shapes, ctx.needs_input_grad[5:5 + K])]
            d_weights = [gemm([(dz.t(), x)], w.dtype, 1.0 / K) if need else None
                         for x, w, need in zip(x_rows, weights, ctx.needs_input_grad[5 + K:])]
        return (dh.view(B, T, D) if need_dh else None, d_carry, None, None, None, *d_xs, *d_weights)


def fused_inject_triton(h, xs, weights, carry, blend: float, eps: float = 1e-6, gemm: str = "triton"):
    """Triton version of `inject_reference` (same arguments, result and gradients).
    gemm="cublas" runs its GEMMs through torch.matmul around the same blend kernels (for the benchmark)."""
    if gemm not in GEMMS:
        raise ValueError(f"fused inject: gemm must be one of {sorted(GEMMS)}, got {gemm!r}")
    xs, weights = list(xs), list(weights)
    _check(h, xs, weights, carry)
    with _on_device(h.device):
        return FusedInject.apply(h, carry, float(blend), float(eps), gemm, *xs, *weights)
