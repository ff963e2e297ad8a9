"""The residual-coupling source's experiments: its coding pair as a preset (GPT-2 and CodeGPT-small-py, offline
from shipped configs) and its protocol (alone / router / coupled under one budget, beside the source's figures),
run here on tiny models."""
from lowmem_graph.cli import main
from lowmem_graph.spec import load_preset


def test_rc_coding_preset_inspects_and_plans_offline(capsys):
    from lowmem_graph.memory.profile import layer_bytes

    assert main(["inspect", "--preset", "rc-coding"]) == 0
    out = capsys.readouterr().out
    assert "124.44M" in out and "124.24M" in out          # GPT-2 with 50,257 tokens, CodeGPT with 50,001
    assert "to codegpt (read 6 token, at 7 gated)" in out and "1,179,650" in out
    assert main(["plan", "--preset", "rc-coding", "--gpu-mem", "2G"]) == 0
    # GPT-2's Conv1D projections are counted as the NF4 linears bitsandbytes makes of them: a block's 7.08M
    # parameters take about half a byte each, not bf16's two
    block = layer_bytes(load_preset("rc-coding"))["gpt2"][0]
    assert 3_500_000 < block < 0.6 * 7_087_872
