"""Frozen nodes: 4-bit loading of the five architectures, hooks, the quantised-node cache, llama2.c nodes."""
import bitsandbytes as bnb
import pytest
import torch
from frozen_run import prefix_of, read_of, run_node

from lowmem_graph.errors import UserError
from lowmem_graph.loading import load_config
from lowmem_graph.nodes import FrozenNode
from lowmem_graph.spec import NodeSpec
from lowmem_graph.tiny import ARCHS

from conftest import shared_data

TEXTS = ["Question: Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nAnswer:", "Short one."]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_loads_frozen_in_nf4(tiny_nodes, arch):
    node = tiny_nodes[arch]
    linears = [m for m in node.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears, "decoder linears must be 4-bit"
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in linears)
    assert not any(p.requires_grad for p in node.model.parameters())
    enc = node.encode(TEXTS)
    states = read_of(node, enc["input_ids"], enc["attention_mask"])
    assert states.shape == (*enc["input_ids"].shape, node.width) and torch.isfinite(states).all()


def test_tokenizers_differ_across_tiny_nodes(tiny_nodes):
    ids = {name: tuple(node.encode(TEXTS[:1])["input_ids"][0].tolist()) for name, node in tiny_nodes.items()}
    assert len(set(ids.values())) == len(ids)
    assert len({len(node.tokenizer) for node in tiny_nodes.values()}) == len(ids)


def test_read_stops_after_read_layer(tiny_nodes):
    node = tiny_nodes["llama"]
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(node.layers)]
    try:
        enc = node.encode(TEXTS)
        read_of(node, enc["input_ids"], enc["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(node.read_layer + 1))


def test_inject_hook_rewrites_input_of_the_injection_layer(tiny_nodes):
    node = tiny_nodes["phi3"]
    enc = node.encode(TEXTS)
    seen = {}

    def capture(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = node.layers[node.inject_layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        plain = run_node(node, enc["input_ids"], enc["attention_mask"])
        steered = run_node(node, enc["input_ids"], enc["attention_mask"], inject=lambda h: h * 0 + 1.0)
    finally:
        handle.remove()
    # the steering hook runs first (prepended for the call), so the layer and later hooks see the rewritten stream
    assert torch.equal(seen["h"], torch.ones_like(seen["h"]))
    assert not torch.allclose(plain, steered)
    assert node.inject_layer == round(0.75 * node.n_layers)


def test_quantised_node_is_saved_once_and_reloaded_without_quantising(monkeypatch, tiny_nodes):
    spec = NodeSpec(name="q", model="tiny:qwen2", role="reader")   # already quantised once by tiny_nodes

    def no_quantising(*args, **kwargs):
        raise AssertionError("quantize_4bit called for a node that was saved quantised")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_quantising)
    said = []
    node = FrozenNode.load(spec, "nf4", "cpu", 64, progress=said.append)
    reference = tiny_nodes["qwen2"]
    for (name, a), (_, b) in zip(node.frozen_tensors(), reference.frozen_tensors()):
        assert torch.equal(a, b), name
    assert said == []           # nothing to quantise, nothing said


def test_a_node_quantised_for_the_first_time_says_so(monkeypatch, tmp_path):
    """On a CPU a 7B model takes minutes to quantise, once: the run says what it is doing."""
    monkeypatch.setenv("LOWMEM_GRAPH_CACHE", str(tmp_path))
    said = []
    FrozenNode.load(NodeSpec(name="q", model="tiny:qwen2", role="reader"), "nf4", "cpu", 64, progress=said.append)
    assert said == ["q: quantising to NF4 on the CPU, once (saved for later runs): 0.1M parameters, under a second "
                    "on two cores"]         # tiny qwen2 has 132,912 parameters


def test_the_quantising_estimate_is_for_this_models_size():
    """Llama-2-7B's shape (6.74B parameters): minutes on a CPU; on a GPU only the size."""
    from transformers import LlamaConfig

    from lowmem_graph.nodes import _quantising_time

    llama7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          vocab_size=32000, tie_word_embeddings=False)
    assert _quantising_time(llama7b, torch.device("cpu")) == "6.7B parameters, about 7 min on two cores"
    assert _quantising_time(llama7b, torch.device("cuda")) == "6.7B parameters"


@pytest.mark.parametrize("quant, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_unquantised_flags(quant, dtype):
    node = FrozenNode.load(NodeSpec(name="m", model="tiny:mistral", role="refiner"), quant, "cpu", 64)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in node.model.modules())
    assert node.layers[0].mlp.up_proj.weight.dtype == dtype
    assert not any(p.requires_grad for p in node.model.parameters())


def test_stories260k_loads_as_a_4bit_node():
    path = shared_data() / "models" / "stories260K" / "stories260K.bin"
    node = FrozenNode.load(NodeSpec(name="s", model=str(path), role="refiner"), "nf4", "cpu", 64)
    assert node.width == 64 and node.n_layers == 5
    enc = node.encode(["Once upon a time, there was a little cat."])
    out = run_node(node, enc["input_ids"], enc["attention_mask"])
    assert out.shape[-1] == 64 and torch.isfinite(out).all()


def test_model_errors(tmp_path):
    with pytest.raises(UserError, match="model path not found"):
        load_config(str(tmp_path / "missing-model"))
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub for model"):
        load_config("nobody-here/no-such-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_config(str(tmp_path / "empty"))
    from transformers import T5Config

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50).save_pretrained(tmp_path / "t5")
    with pytest.raises(UserError, match="not a causal LM"):
        load_config(str(tmp_path / "t5"))


def test_prequantised_folder_loads_as_it_is(tiny_nodes):
    """A folder whose config carries a quantization_config (bitsandbytes here, GPTQ through optimum) is loaded
    pre-quantised, not quantised again."""
    from lowmem_graph.loading import _quantised_cache_dir, resolve_model, source_identity

    source, is_local = resolve_model("tiny:phi3")
    folder = _quantised_cache_dir(source_identity(source, is_local), source, "nf4")
    node = FrozenNode.load(NodeSpec(name="p", model=str(folder), role="refiner"), "nf4", "cpu", 64)
    assert node.model.config.quantization_config.load_in_4bit
    for (name, a), (_, b) in zip(node.frozen_tensors(), tiny_nodes["phi3"].frozen_tensors()):
        assert torch.equal(a, b), name


def test_run_leaves_no_steering_behind(tiny_nodes):
    node = tiny_nodes["mistral"]
    enc = node.encode(TEXTS)
    plain = run_node(node, enc["input_ids"], enc["attention_mask"])
    run_node(node, enc["input_ids"], enc["attention_mask"], inject=lambda h: h * 0.5,
             prefix=prefix_of(node, enc["input_ids"], enc["attention_mask"]))
    assert torch.equal(run_node(node, enc["input_ids"], enc["attention_mask"]), plain)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_matches_the_tokenizer_and_cuts_long_inputs_in_the_middle(tiny_nodes, arch):
    from dataclasses import replace

    node = tiny_nodes[arch]
    spec, max_length = node.spec, node.max_length
    node.spec = replace(spec, prefix="Framing: answer with care.\n")
    try:
        short = node.encode(TEXTS, offsets=True)
        reference = node.tokenizer([node.spec.prefix + t for t in TEXTS], padding=True, return_offsets_mapping=True,
                                   return_tensors="pt")
        real = reference["attention_mask"].bool()
        assert torch.equal(short["attention_mask"], reference["attention_mask"])
        assert torch.equal(short["input_ids"][real], reference["input_ids"][real])
        assert torch.equal(short["offset_mapping"][real], reference["offset_mapping"][real])
        long_text = " ".join(f"filler{i}" for i in range(200)) + " Which gas? A. oxygen B. carbon dioxide"
        whole = node.tokenizer(node.spec.prefix + long_text, return_offsets_mapping=True)
        head = next(i for i, (_, end) in enumerate(whole["offset_mapping"]) if end > len(node.spec.prefix))
        node.max_length = 48
        cut = node.encode([long_text, TEXTS[1]], offsets=True)
        ids = cut["input_ids"][0].tolist()
        assert len(ids) == 48 and cut["attention_mask"][0].all() and head >= 3
        assert ids[:head] == whole["input_ids"][:head]                    # the framing prefix survives
        assert ids[head:] == whole["input_ids"][-(48 - head):]            # the end of the text (the options) too
        assert cut["offset_mapping"][0, -1].tolist() == list(whole["offset_mapping"][-1])
        node.spec = replace(node.spec, prefix="Framing " * 40)
        with pytest.raises(UserError, match="prefix takes"):
            node.encode([long_text])
    finally:
        node.spec, node.max_length = spec, max_length


def test_hub_id_loads_from_the_hub_cache_at_its_commit(tmp_path, monkeypatch):
    """The default path for users (a hub id), offline against a local hub cache: the node's identity, and so its
    quantised copy and prefix-cache keys, carry the commit the id resolved to; a new commit is a new identity."""
    import shutil

    import huggingface_hub.constants

    from lowmem_graph.tiny import tiny_path

    repo = tmp_path / "hub" / "models--lowmem-test--tiny-llama"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = NodeSpec(name="hub", model="lowmem-test/tiny-llama", role="reader")
    identities = []
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(tiny_path("llama"), repo / "snapshots" / commit)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        node = FrozenNode.load(spec, "nf4", "cpu", 64)
        identities.append(node.identity)
        assert node.identity.startswith(f"lowmem-test/tiny-llama@{commit}|nf4")
    pinned = FrozenNode.load(NodeSpec(name="hub", model="lowmem-test/tiny-llama", role="reader", revision="a" * 40),
                             "nf4", "cpu", 64)
    assert pinned.identity == identities[0] != identities[1]


def test_graph_nodes_drop_lm_head_scoring_keeps_it(tiny_nodes):
    """A graph never asks a node for logits: its lm_head is gone (untied: its own weight freed; tied: the
    embedding table stays). Zero-shot scoring loads with `logits=True` and keeps it."""
    for name, node in tiny_nodes.items():
        assert node.model.get_output_embeddings() is None, name
        assert node.base.get_input_embeddings().weight.numel() > 0
        assert not any("lm_head" in k for k, _ in node.frozen_tensors())
    spec = NodeSpec(name="m", model="tiny:mistral", role="refiner")
    scoring = FrozenNode.load(spec, "nf4", "cpu", 64, logits=True)
    head = scoring.model.get_output_embeddings()
    assert head is not None
    dropped = sum(p.numel() for p in tiny_nodes["mistral"].model.parameters())
    assert sum(p.numel() for p in scoring.model.parameters()) == dropped + head.weight.numel()


def test_hub_download_bars_stay_on_where_someone_watches(monkeypatch):
    """transformers' disable_progress_bar turns off the hub's download bars too: a first paper run would download
    38 GB in silence."""
    import types

    from huggingface_hub.utils import are_progress_bars_disabled

    from lowmem_graph import loading as nodes      # where FrozenNode.load's helpers live

    for tty in (True, False):
        monkeypatch.setattr(nodes, "sys", types.SimpleNamespace(stderr=types.SimpleNamespace(isatty=lambda: tty)))
        nodes._quiet_transformers()
        assert are_progress_bars_disabled() is not tty
