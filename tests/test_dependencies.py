"""The layouts of other libraries that our code relies on, checked so that an upgrade fails here, loudly, and not
on a GPU in the middle of a run."""
import importlib.util
import subprocess
import sys
from pathlib import Path

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
    """GroupCheckpoint's hooks and layer_calls' stand-ins (hooks.py) rely on the model's own loop calling every
    layer with the hidden state first (or as `hidden_states=`) and getting a tensor back (transformers 5)."""
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


ROOT = Path(__file__).resolve().parents[1]
# From the checkout's root, where '' (the working directory) is first on sys.path.
FROM_ROOT = [sys.executable, "-c"]


def _from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FROM_ROOT, code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_from_the_root_import_kernels_is_the_hugging_face_hub_or_nothing():
    """bitsandbytes and transformers run `from kernels import ...` (Hugging Face's kernels hub); our kernels/ folder
    installs as lowmem_graph.kernels and, found first from a checkout's root, steps aside for the hub's package, or
    fails as if absent where the hub is not installed."""
    hub = importlib.util.find_spec("kernels")      # conftest leaves the root on sys.path: this is the hand-over
    ours = ROOT / "kernels"
    check = ("import sys, kernels, lowmem_graph.kernels.inject as ours; "
             "print(kernels.__file__, sys.modules['kernels'] is kernels, ours.__file__)")
    run = _from_root(check)
    if hub is None or Path(hub.origin).resolve().parent == ours:
        assert run.returncode == 1 and "No module named 'kernels'" in run.stderr, run.stderr
    else:
        assert run.returncode == 0, run.stderr
        found, same, inject = run.stdout.split()
        assert Path(found).resolve().parent != ours and same == "True"
        assert Path(inject).resolve() == ours / "inject.py"
    # Without the hub on the path (every site folder gone) the name is free: nothing of ours answers it.
    run = _from_root("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
                     "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
                     "    print(e.name, 'kernels' in sys.modules)")
    assert run.returncode == 0 and run.stdout.split() == ["kernels", "False"], run.stderr


def test_from_the_root_transformers_models_and_the_command_line_work():
    """What a fresh install broke (transformers 5.25 imports the hub's kernels at `import transformers`): a model
    built from the root, and `python -m lowmem_graph.cli`, which keeps the root on sys.path."""
    run = _from_root("from transformers import LlamaConfig, LlamaForCausalLM\n"
                     "LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, "
                     "num_key_value_heads=2, num_hidden_layers=1, vocab_size=64))\n"
                     "import bitsandbytes, lowmem_graph\nprint('built')")
    assert run.returncode == 0 and run.stdout.strip() == "built", run.stderr
    run = subprocess.run([sys.executable, "-m", "lowmem_graph.cli", "--version"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
