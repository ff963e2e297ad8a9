"""Triton injection kernels against `inject_reference`: compiled on CUDA tensors where a GPU is, else on CPU
tensors through TRITON_INTERPRET=1 (set in conftest)."""
import types

import pytest
import torch

import lowmem_graph.kernels.inject as inject_kernels
from lowmem_graph import ops
from lowmem_graph.errors import UserError
from lowmem_graph.kernels.inject import fused_inject_triton
from lowmem_graph.ops import inject_reference

READER_WIDTHS = (24, 40, 17, 33)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(K, pooled, dtype, device=DEVICE, B=2, T=5, D=48, L=32, widths=READER_WIDTHS, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    h = rand(B, T, D).requires_grad_()
    xs = [rand(B, d) if pooled else rand(B, T, d) for d in widths[:K]]
    weights = [rand(L, d, scale=d ** -0.5).requires_grad_() for d in widths[:K]]
    carry = rand(D, L, scale=L ** -0.5).requires_grad_()
    return h, xs, weights, carry, rand(B, T, D)


def run(fn, h, xs, weights, carry, dy, blend=0.3):
    """Output and grads of (h, carry, W_1..W_K, and readers that need one) for the same upstream gradient dy."""
    leaves = [t for t in (h, carry, *weights, *xs) if t.requires_grad]
    out = fn(h, xs, weights, carry, blend)
    return out, torch.autograd.grad(out, leaves, dy)


def assert_matches(case, dtype, atol, rtol):
    """atol is relative to the reference's largest magnitude: gradient scales differ by tensor."""
    out, grads = run(fused_inject_triton, *case)
    ref_out, ref_grads = run(inject_reference, *case)
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), atol=atol * want.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", [
    pytest.param(torch.float32, 1e-5, 1e-4, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    # The interpreter upcasts bf16 dots; test_bf16_cuda covers the real ones.
    pytest.param(torch.bfloat16, 1e-2, 2e-2, id="bf16"),
])
@pytest.mark.parametrize("pooled", [False, True], ids=["per_token", "pooled"])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_matches_reference(K, pooled, dtype, atol, rtol):
    assert_matches(make_case(K, pooled, dtype), dtype, atol, rtol)


@pytest.mark.parametrize("pooled", [False, True], ids=["per_token", "pooled"])
def test_readers_that_need_a_gradient_get_the_references(pooled):
    """In an edge graph a latent written into one model is read from a later one: its reader states carry the
    gradient back to the maps upstream."""
    h, xs, weights, carry, dy = make_case(3, pooled, torch.float32)
    xs[1].requires_grad_()
    assert_matches((h, xs, weights, carry, dy), torch.float32, 1e-5, 1e-4)


@pytest.mark.parametrize("h_grad", [True, False])
@pytest.mark.parametrize("pooled", [False, True], ids=["per_token", "pooled"])
def test_degenerate_rows(pooled, h_grad):
    """||u|| below eps (clamped), an all-zero h row, h with and without grad."""
    h, xs, weights, carry, dy = make_case(2, pooled, torch.float32)
    h = h.detach().clone()
    h[0, 1] = 0
    h.requires_grad_(h_grad)
    carry = (carry.detach() * 1e-8).requires_grad_()
    assert_matches((h, xs, weights, carry, dy), torch.float32, 1e-5, 1e-4)


def test_strided_inputs():
    """Views as callers pass them: last-token reader states, transposed weights, h and dy with padded rows."""
    h, xs, weights, carry, dy = make_case(3, False, torch.float32, D=40)
    xs = [x[:, -1] for x in xs]
    weights = [w.detach().t().contiguous().t().requires_grad_() for w in weights]
    h = torch.nn.functional.pad(h.detach(), (0, 3))[..., :40].requires_grad_()
    dy = torch.nn.functional.pad(dy, (0, 5))[..., :40]
    assert_matches((h, xs, weights, carry, dy), torch.float32, 1e-5, 1e-4)


def assert_cublas_matches(case, dtype, atol, rtol):
    out, grads = run(lambda *a: fused_inject_triton(*a, gemm="cublas"), *case)
    ref_out, ref_grads = run(inject_reference, *case)
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got.float(), want.float(), atol=atol * want.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("pooled", [False, True], ids=["per_token", "pooled"])
def test_cublas_gemms_around_the_same_blend_match_the_reference(pooled):
    """The benchmark's comparison: torch.matmul GEMMs, our blend kernels."""
    assert_cublas_matches(make_case(3, pooled, torch.float32), torch.float32, 1e-5, 1e-4)
    with pytest.raises(ValueError, match="gemm must be one of"):
        fused_inject_triton(*make_case(1, pooled, torch.float32)[:4], 0.3, gemm="cuda")


def test_dot_precision_follows_the_result(monkeypatch):
    """A 16-bit stream takes tensor cores (TF32 for anything with fp32); an fp32 stream follows torch's setting."""
    settings = inject_kernels.dot_settings
    assert settings({torch.float32, torch.bfloat16}, torch.bfloat16) == (True, "tf32")
    assert settings({torch.float32}, torch.bfloat16) == (True, "tf32")
    assert settings({torch.float16}, torch.float16) == (False, "tf32")        # a 16-bit dot: precision unused
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert settings({torch.float32, torch.float16}, torch.float32) == (True, "ieee")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert settings({torch.float32, torch.float16}, torch.float32) == (True, "tf32")


def test_every_tile_fits_the_shared_memory_of_consumer_gpus():
    """Shared memory per block: 99 KiB opt-in on sm_86/sm_89 (RTX 30xx/40xx), 64 KiB on sm_75. A tile that does not
    fit fails to launch (OutOfResources); the autotuner skips it, but the few-rows tile is the only candidate for
    16 rows or fewer (pooled injection), so it must fit everywhere. Operands at fp32, the most a tile holds."""
    def shared_bytes(m, n, k, stages):
        return (stages - 1) * (m + n) * k * 4

    assert shared_bytes(16, 128, 64, 4) == 110_592      # the old few-rows tile: what the sm_90 compile reported
    tiles = inject_kernels._TILES
    assert all(shared_bytes(m, n, k, st) <= 99 * 1024 for m, n, k, _, st in tiles)
    few_rows = inject_kernels._fits(inject_kernels.tile_configs(), {"M": 8, "N": 4096})
    assert [(c.kwargs["BLOCK_M"], c.num_stages) for c in few_rows] == [(tiles[0][0], tiles[0][4])]
    assert shared_bytes(*tiles[0][:3], tiles[0][4]) <= 64 * 1024


def test_every_autotuned_tile_gives_the_reference(monkeypatch):
    """The CUDA path's autotuner, replayed on the interpreter: every tile it may pick runs each GEMM through the
    grid it computes from the tile, into the same output the tuner reruns the kernel over."""
    ran = []

    class EveryTile:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                named = dict(zip(inject_kernels._gemm_kernel.arg_names, args))
                for config in inject_kernels._fits(inject_kernels.tile_configs(), named):
                    tile = {**meta, **config.kwargs}
                    ran.append((config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]))
                    inject_kernels._gemm_kernel[grid(tile)](*args, **tile, num_warps=config.num_warps,
                                                            num_stages=config.num_stages)
            return launch

    monkeypatch.setattr(inject_kernels, "_autotuned", lambda device, flops: True)
    monkeypatch.setattr(inject_kernels, "_tuned_gemm_kernel", EveryTile)
    case = make_case(3, False, torch.float32, B=2, T=40, D=160, L=72)
    assert_matches(case, torch.float32, 1e-5, 1e-4)
    assert len(set(ran)) == len(inject_kernels._TILES)           # 80 rows, 72+ columns: every tile fits
    ran.clear()
    pooled = make_case(2, True, torch.float32, L=72)
    with torch.no_grad():
        fused_inject_triton(*pooled[:4], 0.3)
    assert ran == [(16, 128), (16, 128)]                          # pooled forward, 2 rows: the 16-row tile only
    assert_matches(pooled, torch.float32, 1e-5, 1e-4)


def test_rejects_bad_inputs():
    h, xs, weights, carry, _ = make_case(2, False, torch.float32)
    with pytest.raises(ValueError, match="reader 1"):
        fused_inject_triton(h, [xs[0], xs[1][:, :, :-1]], weights, carry, 0.3)


def test_dispatch_honours_env(monkeypatch):
    calls = []
    real = inject_kernels.fused_inject_triton
    monkeypatch.setattr(inject_kernels, "fused_inject_triton", lambda *a: calls.append(1) or real(*a))
    h, xs, weights, carry, _ = make_case(2, True, torch.float32)
    want = inject_reference(h, xs, weights, carry, 0.3)

    monkeypatch.delenv("LOWMEM_GRAPH_INJECT", raising=False)
    assert ops.inject_backend(types.SimpleNamespace(is_cuda=False)) == "torch"
    assert ops.inject_backend(types.SimpleNamespace(is_cuda=True)) == "triton"
    torch.testing.assert_close(ops.fused_inject(h, xs, weights, carry, 0.3), want, atol=1e-5, rtol=1e-4)
    assert calls == ([1] if h.is_cuda else [])
    calls.clear()

    monkeypatch.setenv("LOWMEM_GRAPH_INJECT", "torch")
    assert ops.inject_backend(types.SimpleNamespace(is_cuda=True)) == "torch"

    monkeypatch.setenv("LOWMEM_GRAPH_INJECT", "Triton")
    torch.testing.assert_close(ops.fused_inject(h, xs, weights, carry, 0.3), want, atol=1e-5, rtol=1e-4)
    assert calls == [1]

    monkeypatch.setenv("LOWMEM_GRAPH_INJECT", "cuda")
    with pytest.raises(UserError, match="LOWMEM_GRAPH_INJECT"):
        ops.fused_inject(h, xs, weights, carry, 0.3)


def test_launches_go_to_the_tensors_own_device():
    """Triton launches on the current device: a node on cuda:1 must compute there while cuda:0 is current."""
    guard = inject_kernels._on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(inject_kernels._on_device(torch.device("cpu")), torch.cuda.device)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("pooled", [False, True], ids=["per_token", "pooled"])
def test_on_a_second_card_while_the_first_is_current(pooled):
    torch.cuda.set_device(0)
    assert_matches(make_case(3, pooled, torch.bfloat16, device="cuda:1"), torch.bfloat16, 1e-2, 2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("pooled", [False, True], ids=["per_token", "pooled"])
def test_bf16_cuda(pooled):
    assert_matches(make_case(3, pooled, torch.bfloat16, device="cuda"), torch.bfloat16, 1e-2, 2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype, atol, rtol", [
    pytest.param(torch.float32, 1e-5, 1e-4, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, 2e-2, id="bf16"),
])
@pytest.mark.parametrize("pooled", [False, True], ids=["per_token", "pooled"])
def test_large_cuda(pooled, dtype, atol, rtol):
    case = make_case(3, pooled, dtype, device="cuda", B=4, T=300, D=2000, L=1024, widths=(2048, 1536, 1000))
    assert_matches(case, dtype, atol, rtol)
