"""The planner's per-layer constants against measurement: the five real architectures at reduced width, run on the
CPU in bf16, their saved tensors and allocations measured (saved_tensors_hooks, `LiveBytes`), and compared with what
`memory/profile.py` predicts for the same shapes. The prediction must cover the measurement and be within 10% of it."""
import pytest
import torch

from lowmem_graph.memory import profile as sizes
from lowmem_graph.memory.checkpoint import GroupCheckpoint
from lowmem_graph.memory.report import LiveBytes

ARCHS = {"llama": "meta-llama/Llama-3.2-1B", "qwen2": "Qwen/Qwen2.5-1.5B", "gemma2": "google/gemma-2-2b",
         "phi3": "microsoft/Phi-3-mini-4k-instruct", "mistral": "mistralai/Mistral-7B-v0.1"}
SCALE = 8                   # widths and heads / 8; the sequence keeps the real ratio to the width (512 : 4096)
MICRO, LAYERS = 2, 4


def reduced_model(arch: str):
    """(config, model, seq): the architecture's real configuration with widths and head counts divided by SCALE,
    random bf16 weights, frozen."""
    from transformers import AutoModelForCausalLM

    from lowmem_graph.summary import reduced_config

    config = reduced_config(ARCHS[arch], SCALE, LAYERS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)
    return config, model, max(16, config.hidden_size // 8)


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    config, model, seq = reduced_model(request.param)
    node = sizes.node_profile(request.param, "refiner", config, model, "bf16", 0, 0)
    return request.param, model.model, node, seq


def _inputs(base, node, seq):
    torch.manual_seed(1)
    x = torch.randn(MICRO, seq, node.width, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(MICRO, seq, dtype=torch.long)
    mask[1, -seq // 4:] = 0                     # padding, as in every real batch: SDPA gets a mask
    return x, mask


def measured_layer_saved(base, node, seq) -> int:
    """Bytes autograd saves inside decoder layer 1: no weights, nothing the layer was given."""
    x, mask = _inputs(base, node, seq)
    frozen = {t.untyped_storage().data_ptr() for t in [*base.parameters(), *base.buffers()]}
    given, saved, inside = set(), {}, [False]

    def enter(module, args, kwargs):
        inside[0] = True
        for t in [*args, *kwargs.values()]:
            for u in (t if isinstance(t, tuple) else (t,)):
                if isinstance(u, torch.Tensor):
                    given.add(u.untyped_storage().data_ptr())

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and ptr not in frozen and ptr not in given:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    hooks = [base.layers[1].register_forward_pre_hook(enter, with_kwargs=True),
             base.layers[1].register_forward_hook(lambda *a: inside.__setitem__(0, False))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            base(inputs_embeds=x, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return sum(saved.values())


def measured_checkpointed(base, node, seq, groups) -> tuple[int, int]:
    """(bytes the groups hold between forward and backward, bytes backward allocates at its peak above that),
    the layers run under GroupCheckpoint with the final norm left out (the planner counts it with the head)."""
    x, mask = _inputs(base, node, seq)
    norm, base.norm = base.norm, torch.nn.Identity()
    try:
        with GroupCheckpoint(base.layers, groups), LiveBytes() as live:
            out = base(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
            held = live.live - out.nbytes + x.nbytes     # every group's input (the first one's was given)
            live.reset_peak()
            out.backward(torch.ones_like(out))
            recompute = live.peak - live.live_at_reset
    finally:
        base.norm = norm
    return held, recompute


def measured_inference(base, node, seq) -> int:
    x, mask = _inputs(base, node, seq)
    with torch.no_grad(), LiveBytes() as live:
        base(inputs_embeds=x.detach(), attention_mask=mask, use_cache=False)
    return live.peak + x.nbytes


def _close(measured, predicted, what):
    assert measured <= predicted <= 1.1 * measured, f"{what}: predicted {predicted:,} for {measured:,} measured " \
                                                    f"({predicted / measured:.3f}x)"


def test_a_layer_saves_what_the_planner_says(arch):
    name, base, node, seq = arch
    _close(measured_layer_saved(base, node, seq), sizes.layer_saved(node, MICRO, seq), f"{name} layer saved")


@pytest.mark.parametrize("size", [1, 2, 4])
def test_checkpointed_groups_hold_their_inputs_and_recompute_as_planned(arch, size):
    name, base, node, seq = arch
    groups = [list(range(lo, lo + size)) for lo in range(0, LAYERS, size)]
    held, recompute = measured_checkpointed(base, node, seq, groups)
    tokens = MICRO * seq
    _close(held, len(groups) * tokens * node.width * sizes.ACT_BYTES + sizes.forward_tables(node, MICRO, seq),
           f"{name} checkpoint inputs, groups of {size}")
    _close(recompute, size * sizes.layer_saved(node, MICRO, seq) + sizes.layer_backward(node, MICRO, seq),
           f"{name} recompute, groups of {size}")


def test_a_pass_without_grad_needs_what_the_planner_says(arch):
    name, base, node, seq = arch
    tokens = MICRO * seq
    predicted = (sizes.layer_inference(node, MICRO, seq) + 2 * tokens * node.width * sizes.ACT_BYTES
                 + sizes.forward_tables(node, MICRO, seq))
    _close(measured_inference(base, node, seq), predicted, f"{name} frozen pass")


def quantized(model):
    """The same model with every decoder linear in NF4 (double quantisation, bf16 compute), as nodes load."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name, linear in list(layer.named_modules()):
            if not isinstance(linear, torch.nn.Linear):
                continue
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to("cpu")
            if linear.bias is not None:
                q.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            q.support_avx512bf16_for_cpu = False         # as FrozenNode sets it: one code path with and without grad
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, q)
    return model


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_nf4_layers_add_one_dequantised_weight_to_the_recompute(name):
    """In NF4 the forward keeps nothing more (the fused 4-bit GEMM), and backward dequantises one weight at a time:
    the planner's workspace term (the largest linear in bf16) covers the difference."""
    config, model, seq = reduced_model(name)
    node = sizes.node_profile(name, "refiner", config, model, "nf4", 0, 0)
    groups = [[0, 1], [2, 3]]
    plain_saved = measured_layer_saved(model.model, node, seq)
    plain = measured_checkpointed(model.model, node, seq, groups)
    plain_frozen = measured_inference(model.model, node, seq)
    base = quantized(model).model
    assert measured_layer_saved(base, node, seq) == plain_saved
    held, recompute = measured_checkpointed(base, node, seq, groups)
    assert held == plain[0]
    assert 0 < recompute - plain[1] <= max(node.layer_max_linear) * sizes.ACT_BYTES
    assert measured_inference(base, node, seq) <= plain_frozen + max(node.layer_max_linear) * sizes.ACT_BYTES


def int8(model, frozen=True):
    """The same model with every decoder linear in LLM.int8 (bitsandbytes, outlier threshold 6), as nodes load
    (`frozen`: with FrozenInt8Linear's backward), else bitsandbytes' own Linear8bitLt."""
    import bitsandbytes as bnb

    from lowmem_graph.nodes import freeze_linears

    for layer in model.model.layers:
        for name, linear in list(layer.named_modules()):
            if not isinstance(linear, torch.nn.Linear):
                continue
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(linear.weight.data.float(), requires_grad=False, has_fp16_weights=False)
            q.weight._quantize("cpu")
            if linear.bias is not None:
                q.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            q.eval().init_8bit_state()
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, q)
    return freeze_linears(model) if frozen else model


def test_int8_layers_checkpoint_like_plain_ones_and_their_transients_are_covered():
    """bitsandbytes' int8 autograd keeps each linear's input on its context, out of saved-tensor hooks' reach;
    FrozenInt8Linear keeps nothing, and a checkpointed group's forward records no graph (so bitsandbytes' keeps
    nothing there either): a checkpointed group holds its input alone, as in bf16. The planner's int8 workspace
    covers what forward (input quantisation, int32 product) and backward (the dequantised weight) add."""
    config, model, seq = reduced_model("llama")
    node = sizes.node_profile("llama", "refiner", config, model, "int8", 0, 0)
    groups = [[0, 1], [2, 3]]
    plain = measured_checkpointed(model.model, node, seq, groups)
    plain_frozen = measured_inference(model.model, node, seq)
    bnb_held, _ = measured_checkpointed(int8(reduced_model("llama")[1], frozen=False).model, node, seq, groups)
    base = int8(model).model
    assert measured_layer_saved(base, node, seq) == measured_layer_saved(reduced_model("llama")[1].model, node, seq)
    held, recompute = measured_checkpointed(base, node, seq, groups)
    assert held == plain[0] == bnb_held
    assert 0 < recompute - plain[1] <= sizes.quant_workspace(node, 0, LAYERS, MICRO * seq, backward=True)
    assert measured_inference(base, node, seq) <= plain_frozen + sizes.quant_workspace(node, 0, LAYERS,
                                                                                           MICRO * seq, False)


def test_frozen_int8_input_gradient_is_bitsandbytes_own():
    import bitsandbytes as bnb

    from lowmem_graph.nodes import FrozenInt8Linear

    torch.manual_seed(0)
    q = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=False, threshold=6.0)
    q.weight = bnb.nn.Int8Params(torch.randn(48, 64), requires_grad=False, has_fp16_weights=False)
    q.weight._quantize("cpu")
    q.bias.requires_grad_(False)
    q.eval().init_8bit_state()
    x = (3 * torch.randn(2, 5, 64, dtype=torch.bfloat16)).requires_grad_()
    y = q(x)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    q.__class__ = FrozenInt8Linear
    y2 = q(x)
    (gx2,) = torch.autograd.grad(y2, x, torch.ones_like(y2))
    assert torch.equal(y, y2) and torch.equal(gx, gx2)
