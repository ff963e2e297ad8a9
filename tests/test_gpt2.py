"""GPT-2 as a node (the residual-coupling source's coding pair): `.h` and `.ln_f`, Conv1D projections, learned
positions, a tokenizer without BOS. Run layer by layer as the graph runs it, it gives what the model's own forward
gives."""
import bitsandbytes as bnb
import pytest
import torch
from frozen_run import run_node

from lowmem_graph.loading import linears_from_conv1d
from lowmem_graph.nodes import FrozenNode
from lowmem_graph.spec import NodeSpec
from lowmem_graph.tiny import tiny_path

TEXTS = ["def add(a, b):\n    return a + b", "Plants take in carbon dioxide."]


def test_conv1d_becomes_the_same_linear_bit_for_bit():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path("gpt2"), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        want = model(ids).logits
        converted = linears_from_conv1d(model)
        got = converted(ids).logits
    assert not any(type(m).__name__ == "Conv1D" for m in converted.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in converted.transformer.h.modules()) == 4 * 4
    assert torch.equal(got, want)


@pytest.mark.parametrize("quant", ["fp32", "nf4"])
def test_gpt2_node_layer_by_layer_equals_its_own_forward(quant):
    node = FrozenNode.load(NodeSpec(name="g", model="tiny:gpt2"), quant, "cpu", 64, logits=True)
    if quant == "nf4":      # transformers quantises GPT-2's Conv1D projections as transposed linears
        linears = [m for m in node.layers.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(linears) == 4 * 4 and all(m.weight.quant_state.quant_type == "nf4" for m in linears)
    enc = node.encode(TEXTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert node.tokenizer(TEXTS[0])["input_ids"][0] != node.tokenizer.bos_token_id      # no BOS, as GPT-2
    with torch.no_grad():
        final = run_node(node, ids, mask, at=0)
        base = node.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = node.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        real = mask.bool()
        # the nf4 forward is the same kernels on the same weights: equal up to float reassociation at most
        tol = 0 if quant == "fp32" else 1e-5
        assert torch.allclose(final[real], base[real], atol=tol, rtol=0)
        assert torch.allclose(node.logits(final)[real], logits[real], atol=tol * 10, rtol=0)
        # the stream cached entering a middle layer, run from there on, gives the same
        h, calls = node.layer_calls(ids, mask, start=2)
        again = run_node(node, ids, mask, prefix=h, at=2)
        assert torch.allclose(again[real], base[real], atol=tol, rtol=0)


def test_gpt2_size_in_the_quantising_message_counts_its_two_matrix_mlp():
    from lowmem_graph.loading import bundled_config
    from lowmem_graph.nodes import _quantising_time

    # 124.4M with its position table and biases; GPT-2's MLP has two matrices, not a gated MLP's three (151.8M)
    said = _quantising_time(bundled_config("openai-community/gpt2"), torch.device("cpu"))
    assert said == "123.5M parameters, about 7 s on two cores"
