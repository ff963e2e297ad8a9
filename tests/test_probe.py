"""The INT4 robustness probe (what each format costs a node) and a node's own frozen format."""
import bitsandbytes as bnb
import pytest
import torch

from conftest import shared_data
from lowmem_graph.ablate import apply_changes
from lowmem_graph.cli import main
from lowmem_graph.errors import UserError
from lowmem_graph.probe import round_trip
from lowmem_graph.spec import load_preset


@pytest.mark.parametrize("fmt, levels", [("int8", 255), ("int4-g128", 16)])
def test_round_trips_keep_the_levels_of_their_format(fmt, levels):
    w = torch.randn(8, 256)
    q = round_trip(w, fmt)
    groups = q.view(8, -1) if fmt == "int8" else q.view(8, 2, 128).reshape(16, 128)
    assert all(len(torch.unique(g)) <= levels for g in groups)
    assert (q - w).abs().max() <= w.abs().max() / (127 if fmt == "int8" else 7)
    assert torch.equal(round_trip(w, "full"), w)


def test_stories260k_int8_is_immune_int4_is_not(tmp_path, capsys):
    """The real pretrained model: INT8's perplexity gap is far below INT4's; NF4's is reported, and flagged."""
    path = shared_data() / "models" / "stories260K" / "stories260K.bin"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    assert main(["probe-quant", str(path), "--limit", "32", "--threshold", "5", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    (run,) = tmp_path.iterdir()
    import csv

    rows = {r["format"]: r for r in csv.DictReader(open(run / "probe.csv"))}
    assert set(rows) == {"full", "int8", "int4-g128", "nf4"} and float(rows["full"]["gap_percent"]) == 0.0
    int8, int4, nf4 = (abs(float(rows[f]["gap_percent"])) for f in ("int8", "int4-g128", "nf4"))
    assert int8 < 1.0 and int4 > 10 * int8
    assert float(rows["int8"]["hidden_rel_error"]) < float(rows["int4-g128"]["hidden_rel_error"])
    assert (rows["nf4"]["flagged"] == "True") == (nf4 > 5) and "| stories260K | nf4 |" in out


def test_probe_reads_every_node_of_a_graph_where_the_graph_reads_or_injects(tmp_path, capsys):
    assert main(["probe-quant", "--preset", "tiny", "--limit", "8", "--out", str(tmp_path)]) == 0
    text, err = capsys.readouterr()
    assert "probing 1/5 llama (tiny:llama): 8 texts in full precision, int8, int4-g128 and nf4" in text
    assert "probing 5/5 " in text                       # each node says when it starts; without a terminal,
    assert any(line.startswith("mistral nf4 batch 1/1 |") for line in err.splitlines())     # each batch too
    assert "| llama | nf4 |" in text and "output of decoder layer 4/4" in text       # readers: their read layer
    assert "| mistral | int4-g128 |" in text and "input of decoder layer 4/4" in text  # refiners: injection


def test_a_text_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "t.txt"
    bad.write_bytes(b"fine line\ncaf\xe9\n")
    assert main(["probe-quant", "--preset", "tiny", "--text", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t.txt:2" in err and "not UTF-8" in err


def _layer_bytes(layer) -> int:
    """Bytes a decoder layer's forward reads, each tensor once (an int8 weight is its state's CB), its small
    parameters (norms, biases) at bf16: the compute dtype on CUDA, which the planner sizes for (here they are fp32)."""
    from lowmem_graph.memory.stream import _sites

    sizes = {}
    for owner, _, t in _sites([layer]):
        small = isinstance(owner, torch.nn.Parameter) and t.dim() == 1 and t.is_floating_point()
        sizes[t.data_ptr()] = t.numel() * 2 if small else t.nbytes
    return sum(sizes.values())


def test_a_node_may_keep_its_own_format(tmp_path):
    from lowmem_graph.edge_graph import EdgeGraph
    from lowmem_graph.memory.profile import layer_bytes

    spec = apply_changes(load_preset("tiny"), ["nodes.mistral.quant=bf16", "nodes.qwen2.quant=int8"])
    sizes, base = layer_bytes(spec), layer_bytes(load_preset("tiny"))
    assert sizes["mistral"][0] > 3 * base["mistral"][0] and sizes["phi3"] == base["phi3"]
    assert base["qwen2"][0] < sizes["qwen2"][0] < layer_bytes(load_preset("tiny"), "bf16")["qwen2"][0]
    graph = EdgeGraph.build(spec, "cpu")
    modules = {name: list(node.model.modules()) for name, node in graph.nodes.items()}
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in modules["mistral"])
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in modules["phi3"])
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in modules["qwen2"])
    for name, quant in [("mistral", "bf16"), ("phi3", "nf4"), ("qwen2", "int8")]:
        assert f"|{quant}|" in graph.nodes[name].identity
        assert [_layer_bytes(layer) for layer in graph.nodes[name].layers] == sizes[name], name   # sized exactly
    with pytest.raises(UserError, match="quant must be one of nf4, int8, bf16, fp32, got 'int4'"):
        apply_changes(load_preset("tiny"), ["nodes.mistral.quant=int4"])
