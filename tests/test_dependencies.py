"""The layouts of other libraries that our code relies on, checked so that an upgrade fails here, loudly, and not
on a GPU in the middle of a run."""
import bitsandbytes as bnb
import torch

from lowmem_graph.memory.stream import _sites


def _quantised_linear():
    linear = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                               compress_statistics=True)
    linear.weight = bnb.nn.Params4bit(torch.randn(128, 64, dtype=torch.bfloat16), requires_grad=False,
                                      quant_type="nf4", compress_statistics=True).to("cpu")
    return linear


def test_quant_state_tensors_are_the_ones_the_streamer_moves():
    """LayerStreamer finds a 4-bit weight's tensors by walking `vars(quant_state)` and `state2`: if bitsandbytes
    adds, renames or nests a tensor differently, streaming would leave it behind on the host."""
    state = _quantised_linear().weight.quant_state
    layout = {k: type(v).__name__ for k, v in vars(state).items()}
    nested = {k: type(v).__name__ for k, v in vars(state.state2).items()}
    assert layout == {"absmax": "Tensor", "shape": "Size", "code": "Tensor", "dtype": "dtype", "blocksize": "int",
                      "quant_type": "str", "offset": "Tensor", "state2": "QuantState", "nested": "bool"}
    assert nested == {"absmax": "Tensor", "shape": "NoneType", "code": "Tensor", "dtype": "dtype", "blocksize": "int",
                      "quant_type": "NoneType", "offset": "NoneType", "state2": "NoneType", "nested": "bool"}


def test_the_streamer_finds_every_tensor_a_4bit_forward_reads():
    linear = _quantised_linear()
    found = {(t.data_ptr(), t.nbytes) for _, _, t in _sites([linear])}
    state = linear.weight.quant_state
    for t in (linear.weight.data, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code):
        assert (t.data_ptr(), t.nbytes) in found


def test_decoder_layers_are_called_by_the_model_loop_with_the_hidden_state_first():
    """GroupCheckpoint replaces each decoder layer's forward and relies on the model's own loop calling every layer
    with the hidden state first (or as `hidden_states=`) and getting a tensor back (transformers 5)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=64)).eval()
    seen = []

    def record(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.shape, type(output)))

    hooks = [layer.register_forward_hook(record, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model.model(input_ids=torch.zeros(1, 5, dtype=torch.long))
    for h in hooks:
        h.remove()
    assert seen == [(torch.Size([1, 5, 32]), torch.Tensor)] * 2


def test_our_kernels_folder_never_stands_in_for_the_hugging_face_kernels_hub():
    """bitsandbytes and transformers run `from kernels import get_kernel`; ours installs as lowmem_graph.kernels."""
    import importlib.util
    from pathlib import Path

    import lowmem_graph.kernels

    spec = importlib.util.find_spec("kernels")
    ours = Path(lowmem_graph.kernels.__file__).resolve().parent
    assert spec is None or Path(spec.origin or "").resolve().parent != ours
