"""Baselines: zero-shot log-likelihood scoring checked against a plain forward, head sizing, the full report."""
import dataclasses
import json

import pytest
import torch

from conftest import shared_data
from lowmem_graph.baselines import CONTEXT, head_baseline_spec, run_baselines, score_zero_shot
from lowmem_graph.data import Question
from lowmem_graph.nodes import FrozenNode
from lowmem_graph.spec import NodeSpec, load_preset
from lowmem_graph.summary import describe
from lowmem_graph.train import TrainConfig


def direct_loglikelihoods(node, question):
    """One unpadded forward per full string; the continuation is what follows the context's tokens."""
    context = CONTEXT.format(stem=question.question)
    scores = []
    for choice in question.choices:
        whole = node.tokenizer(context + " " + choice)["input_ids"]
        start = len(node.tokenizer(context)["input_ids"])
        with torch.no_grad():
            logp = node.model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        scores.append(sum(logp[i - 1, whole[i]].item() for i in range(start, len(whole))))
    return scores


def test_zero_shot_matches_a_plain_forward_and_normalises_by_bytes():
    path = shared_data() / "models/stories260K/stories260K.bin"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    node = FrozenNode.load(NodeSpec(name="s", model=str(path), role="refiner"), "fp32", "cpu", 128, logits=True)
    # Picked so the three rules disagree: the short "zoo" has the highest sum, "a café" the highest per byte
    # (é is two bytes), "a quilt" the highest per character.
    question = Question("hand-1", "What did Lily see in the park?", ("a café", "a quilt", "zoo"), 0)
    direct = direct_loglikelihoods(node, question)
    result = score_zero_shot(node, [question], batch_size=2, progress=False)
    prediction = result.predictions[0]
    assert prediction["loglikelihoods"] == pytest.approx(direct, abs=1e-4)

    def best(values):
        return max(range(3), key=values.__getitem__)

    per_byte = [s / len(c.encode("utf-8")) for s, c in zip(direct, question.choices)]
    per_char = [s / len(c) for s, c in zip(direct, question.choices)]
    assert (best(direct), best(per_byte), best(per_char)) == (2, 0, 1)
    assert (prediction["prediction"], prediction["prediction_norm"]) == (2, 0)
    assert (result.acc, result.acc_norm, result.n) == (0.0, 1.0, 1)
    assert result.acc_interval[0] == 0.0 < result.acc_interval[1] < result.acc_norm_interval[1] == 1.0


def test_batched_scoring_of_a_4bit_node_matches_per_string_forwards(questions):
    node = FrozenNode.load(NodeSpec(name="llama", model="tiny:llama", role="reader"), "nf4", "cpu", 512, logits=True)
    chunk = questions[:6]
    result = score_zero_shot(node, chunk, batch_size=5, progress=False)   # batches mix questions and lengths
    for question, prediction in zip(chunk, result.predictions):
        direct = direct_loglikelihoods(node, question)
        assert prediction["loglikelihoods"] == pytest.approx(direct, abs=1e-4)
        assert prediction["prediction"] == max(range(len(direct)), key=direct.__getitem__)
    assert result.acc == sum(p["correct"] for p in result.predictions) / len(chunk)


def test_head_baseline_matches_the_paper_graphs_trainable_count():
    spec = load_preset("paper")
    target = sum(describe(spec)[1].values())
    assert target == 17_577_985
    head = head_baseline_spec(spec, "phi3", target)
    assert [(n.name, n.role) for n in head.nodes] == [("phi3", "refiner")] and head.readers == []
    assert head.latent_dim % spec.output.heads == 0
    count = sum(describe(head)[1].values())
    assert abs(count - target) / target < 0.01
    for step in (-spec.output.heads, spec.output.heads):   # no other width is closer
        other = dataclasses.replace(head, latent_dim=head.latent_dim + step)
        assert abs(sum(describe(other)[1].values()) - target) >= abs(count - target)
    assert head_baseline_spec(spec, "llama", target).nodes[0].role == "refiner"   # a reader becomes the refiner


@pytest.mark.slow
def test_run_baselines_writes_one_row_per_node(tiny_spec, tmp_path):
    cfg = TrainConfig.from_dict({**tiny_spec.train, "limit_train": 16, "limit_eval": 8, "epochs": 1,
                                 "device": "cpu"})
    table = run_baselines(tiny_spec, cfg, tmp_path / "out", progress=False)
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0].strip("| ") for row in rows[1:]] == [n.name for n in tiny_spec.nodes]
    report = json.loads((tmp_path / "out" / "baselines.json").read_text())
    assert report["n"] == 8 and len(report["nodes"]) == len(tiny_spec.nodes)
    for row in report["nodes"]:
        assert 0 <= row["zero_shot"]["acc"] <= 1 and 0 <= row["head"]["acc"] <= 1
        assert (tmp_path / "out" / f"head-{row['node']}" / "trainable.safetensors").is_file()
