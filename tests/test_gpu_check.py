"""The prepared device check runs here as its CPU smoke run, so the script that a GPU session spends its
device-minutes on cannot rot: every part exits 0 and every file it promises is written."""
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is what runs without CUDA")
def test_gpu_check_smoke_run_writes_every_file(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["kernels-cpu-smoke.csv", "kernels-cpu-smoke.png", "logs.txt", "memory-cpu-smoke.csv",
                     "memory-cpu-smoke.png", "parts.txt", "summary.md", "versions.txt"]    # the device tool takes 8
    parts = {line.split()[0]: line.split()[1] for line in (out / "parts.txt").read_text().splitlines()}
    assert parts == {"gpu-tests": "0", "memory": "0", "kernels": "0"}, (out / "logs.txt").read_text()[-3000:]
    summary = (out / "summary.md").read_text()
    for words in ("CPU smoke run", "bitsandbytes 0.50", "## Memory: measured peak", "frozen pass mistral",
                  "every group streamed", "accelerate cpu_offload", "## Fused injection kernel", "per_token"):
        assert words in summary, words
    assert (out / "memory-cpu-smoke.png").read_bytes()[:4] == b"\x89PNG"
