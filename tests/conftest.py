import os
import tempfile
from pathlib import Path

import torch  # defines no @triton.jit: the flag below is still in time

# Triton on CPU only works through its interpreter, and the flag must be set before any @triton.jit runs. With a
# GPU the kernels are compiled: the kernel tests then run on CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A fresh cache per test session: tiny models are built and quantised from scratch, as on a new machine.
os.environ.setdefault("LOWMEM_GRAPH_CACHE", tempfile.mkdtemp(prefix="lowmem-graph-test-cache-"))

import pytest  # noqa: E402

SHARED = Path(os.environ.get("LOWMEM_GRAPH_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def hub_response(status: int):
    """An HTTP response as huggingface_hub's errors carry it: httpx2 from hub 2, httpx before (transformers 5.17,
    the GPU machine's, pins hub 1)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/org/model"))


def shared_data() -> Path:
    """The real data beside the checkout (ARC, OpenBookQA, stories260K); tests that need it skip without it."""
    data = SHARED / "data"
    if not (data / "arc").is_dir():
        pytest.skip(f"shared data not found at {data}")
    return data


@pytest.fixture(scope="session")
def tiny_spec():
    from lowmem_graph.spec import load_preset

    return load_preset("tiny")


@pytest.fixture(scope="session")
def tiny_nodes(tiny_spec):
    """The five tiny 4-bit nodes, loaded once; tests build fresh trainable parts around them."""
    from lowmem_graph.edge_graph import EdgeGraph

    return EdgeGraph.build(tiny_spec, "cpu").nodes


@pytest.fixture
def tiny_graph(tiny_spec, tiny_nodes):
    from lowmem_graph.edge_graph import EdgeGraph

    torch.manual_seed(0)
    return EdgeGraph(tiny_spec, tiny_nodes)


@pytest.fixture
def streamers_made(monkeypatch):
    """Every LayerStreamer made during the test, in order (to count their loads and check they let go)."""
    from lowmem_graph.memory import stream

    made = []

    class Recorded(stream.LayerStreamer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(stream, "LayerStreamer", Recorded)
    return made


@pytest.fixture(scope="session")
def questions():
    from lowmem_graph.data import load_task

    return load_task("arc-easy", "train", limit=16)


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """One short tiny run (1 epoch, 16 questions), trained once for the tests that read a run folder (and do not
    change it)."""
    from lowmem_graph.cli import main

    run = tmp_path_factory.mktemp("runs") / "short"
    assert main(["train", "--run-dir", str(run), "--epochs", "1", "--limit-train", "16", "--limit-eval", "8",
                 "--no-progress"]) == 0
    return run


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory):
    """One short lm run of examples/residual_coupling.yaml with --compare (alone, router, coupled; 16 passages, one
    step), trained once for the tests that read an lm run folder (and do not change it)."""
    from lowmem_graph.cli import main

    run = tmp_path_factory.mktemp("runs") / "lm"
    example = Path(__file__).resolve().parents[1] / "examples" / "residual_coupling.yaml"
    assert main(["train", "--graph", str(example), "--compare", "--run-dir", str(run), "--epochs", "1",
                 "--limit-train", "16", "--limit-eval", "8", "--no-progress"]) == 0
    return run


@pytest.fixture(scope="session")
def lm_graph(lm_run):
    """The lm run's coupled graph on the CPU with its trained weights, and each variant's router (None but for the
    router), for tests that read it (and leave it as they found it)."""
    from safetensors.torch import load_file

    from lowmem_graph.edge_graph import EdgeGraph
    from lowmem_graph.objectives import Baseline
    from lowmem_graph.settings import load_run_config

    spec, cfg = load_run_config(lm_run)
    graph = EdgeGraph.build(spec, "cpu", seed=cfg.seed, objective="lm")
    graph.load_trainable(load_file(str(lm_run / "weights-coupled.safetensors")), "coupled")
    baseline = Baseline(graph, "router")
    baseline.load_trainable(load_file(str(lm_run / "weights-router.safetensors")), "router")
    return graph.eval(), {"alone": None, "router": baseline.router, "coupled": None}
