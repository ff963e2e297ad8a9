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


def _pair(tmp_path):
    """tiny:gpt2 and tiny:llama coupled both ways (two tokenizers, two architectures), as the source's pair."""
    import yaml

    bridge = {"read": 2, "pooling": "token", "at": 3, "kind": "bridge"}
    path = tmp_path / "pair.yaml"
    path.write_text(yaml.safe_dump({
        "name": "gpt2_llama", "max_length": 64,
        "nodes": [{"name": "gpt2", "model": "tiny:gpt2"}, {"name": "llama", "model": "tiny:llama"}],
        "edges": [{"from": "gpt2", "to": "llama", **bridge}, {"from": "llama", "to": "gpt2", **bridge}],
        "output": {"reads": ["gpt2", "llama"]}, "train": {"objective": "lm", "batch_size": 8, "lr": 0.01}}))
    return path


def test_reproduce_residual_coupling_trains_three_variants_and_prints_them_beside_the_source(tmp_path, capsys):
    import json

    run = tmp_path / "run"
    assert main(["reproduce", "--source", "residual-coupling", "--graph", str(_pair(tmp_path)), "--task",
                 "openbook-facts", "--limit-train", "16", "--limit-test", "8", "--epochs", "1", "--run-dir", str(run),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    ours = json.loads((run / "lm-results.json").read_text())
    assert list(ours) == ["alone", "router", "coupled"]
    assert json.loads((run / "results.json").read_text())["ours"] == ours
    assert ours["coupled"]["trainable"] == 2 * 64 * 64 + 2 and ours["coupled"]["steps"] == 2
    assert ours["coupled"]["perplexity"] != ours["alone"]["perplexity"]        # the bridges trained
    table = (run / "results.md").read_text()
    for variant, source in (("alone", "7 million | 57.08"), ("router", "878.00 | 56.80"), ("coupled", "5.91 | 11.02")):
        r = ours[variant]
        row = f"| {variant} | {r['trainable']:,} | {r['perplexity']['gpt2']:.2f} | {r['perplexity']['llama']:.2f} | "
        assert row + source + " |" in table and row in out
    assert "Not run: TruthfulQA health MC1: +9.1 points" in table


def test_reproduce_keeps_each_sources_flags_apart(tmp_path, capsys):
    assert main(["reproduce", "--source", "residual-coupling", "--tasks", "openbookqa", "--run-dir",
                 str(tmp_path / "a")]) == 2
    assert main(["reproduce", "--task", "openbook-facts", "--run-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--tasks is the paper's protocol's" in err and "--task is --source residual-coupling's" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reproduce_reads_its_graph_as_every_command_does(tmp_path, monkeypatch):
    """--graph is read by settings.load_config, the one reader of a config file: a run's config.yaml of the older
    form (the mappings graph: and train:) is taken, its training settings with it."""
    import yaml

    from lowmem_graph import reproduce_rc

    raw = yaml.safe_load(_pair(tmp_path).read_text())
    older = tmp_path / "config.yaml"
    older.write_text(yaml.safe_dump({"graph": {k: v for k, v in raw.items() if k != "train"},
                                     "train": {**raw["train"], "lr": 0.02}}))
    seen = {}

    def ran(spec, cfg, run_dir, progress=True, log=print):
        seen.update(spec=spec, cfg=cfg)
        return run_dir / "results.md"

    monkeypatch.setattr(reproduce_rc, "reproduce_rc", ran)
    assert main(["reproduce", "--source", "residual-coupling", "--graph", str(older), "--run-dir",
                 str(tmp_path / "run"), "--no-progress"]) == 0
    assert seen["spec"].name == "gpt2_llama" and [n.name for n in seen["spec"].nodes] == ["gpt2", "llama"]
    assert seen["cfg"].lr == 0.02 and seen["cfg"].objective == "lm"
