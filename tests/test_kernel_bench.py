"""The kernel benchmark's bookkeeping on synthetic rows (CPU), its no-GPU path, and one real measurement on CUDA."""
import csv
import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kernel_bench as kb  # noqa: E402
from kernel_bench import Case  # noqa: E402

SMALL = {"batch": 2, "seq_len": 3, "d_model": 8, "latent": 4, "widths": (5, 6)}  # N=6 rows of h, S=11


@pytest.mark.parametrize("mode, direction, expected", [
    # h 6*8*2, x 2*11*2, W 4*11*4, carry 8*4*4, out 6*8*2
    ("pooled", "fwd", 96 + 44 + 176 + 128 + 96),
    # dy+h 2*96, x 44, z min(2*4*4, W 176), carry 128, dh 96, dW 176, dcarry 128
    ("pooled", "bwd", 192 + 44 + 32 + 128 + 96 + 176 + 128),
    # x is per token: 6*11*2
    ("per_token", "fwd", 96 + 132 + 176 + 128 + 96),
    ("per_token", "bwd", 192 + 132 + 96 + 128 + 96 + 176 + 128),
])
def test_min_bytes_small_shape(mode, direction, expected):
    case = Case(mode, **SMALL)
    assert kb.min_bytes(case, direction) == expected
    assert kb.min_bytes(case, "full") == kb.min_bytes(case, "fwd") + kb.min_bytes(case, "bwd")


def test_min_bytes_recomputes_latent_when_cheaper():
    # per-token z is 6*4*4 = 96 bytes, re-reading W (4*1*4 = 16) is cheaper
    case = Case("per_token", **{**SMALL, "widths": (1,)})
    assert kb.min_bytes(case, "bwd") == 192 + 12 + 16 + 128 + 96 + 16 + 128


@pytest.mark.parametrize("name, gbs", [
    ("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 PCIe", 2000), ("NVIDIA H200", 4800),
    ("NVIDIA A100-SXM4-80GB", 2039), ("NVIDIA A100-SXM4-40GB", 1555), ("NVIDIA GeForce RTX 4090", 1008),
    ("NVIDIA GeForce RTX 3090", 936), ("NVIDIA L4", 300), ("NVIDIA A10G", 600), ("Tesla T4", 320),
    ("NVIDIA GeForce RTX 3090 Ti", None), ("NVIDIA L40S", None), ("NVIDIA H100 NVL", None),
])
def test_spec_bandwidth(name, gbs):
    assert kb.spec_bandwidth(name) == gbs


def test_bench_cases_cover_paper_shapes_and_sweep():
    quick = kb.bench_cases(quick=True)
    assert {(c.mode, c.seq_len, c.d_model) for c in quick} == {
        (m, 512, d) for m in ("pooled", "per_token") for d in (3072, 4096)}
    assert all(c.batch == 8 and c.widths == (2048, 1536, 2304) and c.latent == 1024 for c in quick)
    assert [(c.mode, c.d_model) for c in quick[:2]] == [("pooled", 4096), ("per_token", 4096)]   # first if cut short
    sweep = {c.seq_len for c in kb.bench_cases() if c.d_model == kb.SWEEP_D}
    assert sweep == set(kb.SWEEP_SEQ_LENS)


def synthetic_rows(triton_ms=1.0, triton_mib=10.0):
    """Rows as run_kernel_bench makes them, before comparisons; eager 3 ms/40 MiB, compile 2 ms/30 MiB, cuBLAS
    GEMMs around our blend 1.5 ms/20 MiB."""
    meta = {"date": "2025-01-01T00:00:00", "device": "Fake GPU", "torch": "2.x", "triton": "3.x", "peak_gbs": 1000.0,
            "peak_gbs_source": "spec sheet", "fp32_matmul": "highest"}
    rows = []
    for mode, t, impl, direction in itertools.product(("pooled", "per_token"), (128, 512), kb.IMPLS, kb.DIRECTIONS):
        ms, mib = {"eager": (3.0, 40.0), "compile": (2.0, 30.0), "triton": (triton_ms, triton_mib),
                   "cublas": (1.5, 20.0)}[impl]
        ms *= t / 128
        rows.append({**meta, "mode": mode, "batch": 8, "seq_len": t, "d_model": 64, "latent": 16,
                     "readers": "32/48", "act_dtype": "bfloat16", "param_dtype": "float32", "impl": impl,
                     "direction": direction, "ms_median": ms, "ms_p20": 0.9 * ms, "ms_p80": 1.1 * ms,
                     "peak_mem_mib": mib, "min_bytes": 10 ** 6, "gbs": 1 / ms, "bw_share": 0.001 / ms})
    return rows


@pytest.mark.parametrize("triton_ms, triton_mib, met", [
    (1.0, 10.0, "yes"),
    (2.1, 10.0, "no"),   # 1.43x eager, slower than compile
    (1.0, 35.0, "no"),   # fast but more memory than compile
])
def test_comparisons_and_goal(triton_ms, triton_mib, met):
    rows = kb.add_comparisons(synthetic_rows(triton_ms, triton_mib))
    base_ms = {"eager": 3.0, "compile": 2.0, "triton": triton_ms, "cublas": 1.5}
    for row in rows:
        assert row["speedup_vs_eager"] == round(3.0 / base_ms[row["impl"]], 3)
        assert row["speedup_vs_compile"] == round(2.0 / base_ms[row["impl"]], 3)
        assert row["triton_vs_cublas"] == (round(1.5 / triton_ms, 3) if row["impl"] == "triton" else "")
        assert row["meets_goal"] == (met if row["impl"] == "triton" else "")
    assert f"met in {12 if met == 'yes' else 0} of 12 rows" in kb.format_table(rows)


def test_csv_has_expected_columns(tmp_path):
    rows = kb.add_comparisons(synthetic_rows())
    path = kb.write_csv(rows, tmp_path / "out" / "kernels-fake-gpu.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        read = list(reader)
    assert reader.fieldnames == kb.COLUMNS
    assert len(read) == len(rows) == 2 * 2 * 4 * 3
    first = read[0]
    assert (first["device"], first["act_dtype"], first["param_dtype"]) == ("Fake GPU", "bfloat16", "float32")
    assert {r["impl"] for r in read} == set(kb.IMPLS) and {r["direction"] for r in read} == set(kb.DIRECTIONS)


def test_plot_png_from_rows(tmp_path):
    path = kb.plot_rows(kb.add_comparisons(synthetic_rows()), tmp_path / "kernels-fake-gpu.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_slug():
    assert kb.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_no_gpu_prints_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out_dir = tmp_path / "results"
    assert kb.run_kernel_bench(out_dir) is None
    assert capsys.readouterr().out == f"{kb.NO_GPU}\n"
    assert not out_dir.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_measure_small_case_on_cuda(impl):
    case = Case("per_token", batch=2, seq_len=16, d_model=256, latent=64, widths=(32, 48))
    results = kb.measure_case(case, impl)
    assert set(results) == set(kb.DIRECTIONS)
    for (med, p20, p80), peak in results.values():
        assert 0 < p20 <= med <= p80
        assert peak > 0


def test_a_benchmark_that_measured_nothing_exits_non_zero(tmp_path, monkeypatch, capsys):
    """Each GPU benchmark run as a script, without CUDA: exit 3 and one line, nothing written."""
    import runpy
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for script in ("bench_kernels.py", "bench_memory.py"):
        monkeypatch.setattr("sys.argv", [script, "--out", str(tmp_path / "r")])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(bench / script), run_name="__main__")
        out = capsys.readouterr().out
        assert exit_.value.code == 3 and "nothing measured" in out, (script, out)
        assert not (tmp_path / "r").exists()
