"""Baselines: zero-shot log-likelihood scoring checked against the harness's own recipe, head sizing, the report."""
import dataclasses
import json

import pytest
import torch

from conftest import shared_data
from lowmem_graph.baselines import (CONTEXT, _encode_pair, harness_predictions, head_baseline_spec,
                                    score_zero_shot)
from lowmem_graph.questions import Question
from lowmem_graph.errors import UserError
from lowmem_graph.nodes import FrozenNode
from lowmem_graph.spec import NodeSpec, load_preset
from lowmem_graph.summary import describe


def harness_window(tokenizer, context, continuation, max_length):
    """lm-evaluation-harness's HFLM (`_encode_pair`, then `_loglikelihood_tokens`), written out: the token ids it
    feeds the model, and the continuation's tokens, scored at the last len(continuation_enc) positions."""
    context_enc = tokenizer(context)["input_ids"]
    continuation_enc = tokenizer(context + continuation)["input_ids"][len(context_enc):]
    return (context_enc + continuation_enc)[-(max_length + 1):][:-1], continuation_enc


def harness_loglikelihoods(node, question, max_length=None):
    """One unpadded forward per choice on the harness's window, with autocast off."""
    context = CONTEXT.format(stem=question.question)
    scores = []
    for choice in question.choices:
        inp, cont = harness_window(node.tokenizer, context, " " + choice, max_length or node.max_length)
        with torch.no_grad(), torch.autocast(node.device.type, enabled=False):
            logp = node.model(torch.tensor([inp], device=node.device)).logits[0].float().log_softmax(-1)
        logp = logp[len(inp) - len(cont):len(inp)]
        scores.append(logp.gather(-1, torch.tensor(cont, device=logp.device)[:, None]).sum().item())
    return scores


@pytest.fixture(scope="module")
def stories():
    path = shared_data() / "models/stories260K/stories260K.bin"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return FrozenNode.load(NodeSpec(name="s", model=str(path), role="refiner"), "fp32", "cpu", 128, logits=True)


def test_the_three_rules_pick_as_the_harness_does():
    # "a café" has 6 characters and 7 bytes: per character it loses to "a quilt", per byte it wins.
    choices = ("a café", "a quilt", "zoo")
    assert harness_predictions([-6.0, -6.5, -4.0], choices) == (2, 1, 0)
    assert harness_predictions([-7.0, -7.0, -20.0], ("ab", "cd", "efgh")) == (0, 0, 0)   # ties: the first, as argmax
    assert harness_predictions([-3.0, -9.0], ("", "abc")) == (0, 1, 1)    # an empty choice: -inf per character


def test_zero_shot_matches_the_harness_and_reports_acc_norm_per_character_and_acc_bytes_per_byte(stories):
    node = stories
    # Picked so the three rules disagree: the short "zoo" has the highest sum, "a café" the highest per byte
    # (é is two bytes), "a quilt" the highest per character.
    question = Question("hand-1", "What did Lily see in the park?", ("a café", "a quilt", "zoo"), 0)
    direct = harness_loglikelihoods(node, question)
    result = score_zero_shot(node, [question], batch_size=2, progress=False)
    prediction = result.predictions[0]
    assert prediction["loglikelihoods"] == pytest.approx(direct, abs=1e-4)

    def best(values):
        return max(range(3), key=values.__getitem__)

    per_byte = [s / len(c.encode("utf-8")) for s, c in zip(direct, question.choices)]
    per_char = [s / len(c) for s, c in zip(direct, question.choices)]
    assert (best(direct), best(per_char), best(per_byte)) == (2, 1, 0)
    assert (prediction["prediction"], prediction["prediction_norm"], prediction["prediction_bytes"]) == (2, 1, 0)
    assert (prediction["correct"], prediction["correct_norm"], prediction["correct_bytes"]) == (False, False, True)
    assert (result.acc, result.acc_norm, result.acc_bytes, result.n, result.dtype) == (0.0, 0.0, 1.0, 1, "float32")
    assert result.acc_interval == result.acc_norm_interval
    assert result.acc_interval[0] == 0.0 < result.acc_interval[1] < result.acc_bytes_interval[1] == 1.0


def test_an_over_long_input_is_cut_as_the_harness_cuts_it(stories):
    node = stories
    question = Question("hand-2", "What did Lily see in the park?",
                        ("a café", "a quilt", "zoo", "a big red ball that was very shiny and round"), 3)
    context = CONTEXT.format(stem=question.question)       # 32 tokens (BOS included)
    max_length = 34
    expected = [harness_window(node.tokenizer, context, " " + c, max_length)[0] for c in question.choices]
    totals = [len(node.tokenizer(context + " " + c)["input_ids"]) for c in question.choices]
    assert totals == [37, 38, 35, 49]      # cut by 2, 3, not at all (exactly max_length + 1), and by 14 tokens
    fed = []

    def record(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        fed.extend(row[: int(m.sum())].tolist() for row, m in zip(ids, mask))

    node.max_length = max_length
    handle = node.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = score_zero_shot(node, [question], batch_size=3, progress=False)
    finally:
        handle.remove()
        node.max_length = 128
    assert sorted(fed) == sorted(expected)
    assert [len(ids) for ids in expected] == [34, 34, 34, 34]
    assert expected[2] == node.tokenizer(context + " zoo")["input_ids"][:-1]             # nothing cut
    assert expected[0] == node.tokenizer(context + " a café")["input_ids"][-35:-1]      # BOS and one more go
    direct = harness_loglikelihoods(node, question, max_length)
    assert result.predictions[0]["loglikelihoods"] == pytest.approx(direct, abs=1e-4)
    assert result.predictions[0]["loglikelihoods"] != pytest.approx(harness_loglikelihoods(node, question), abs=1e-3)

    # A continuation may take all max_length tokens (the context token before it is not fed but predicts it).
    window, n = _encode_pair(node.tokenizer, context, " a big red ball that was very shiny and round", 17)
    assert n == 17 and len(window) == 18 and window[:-1] == harness_window(
        node.tokenizer, context, " a big red ball that was very shiny and round", 17)[0]
    with pytest.raises(UserError, match="1 to 16"):
        _encode_pair(node.tokenizer, context, " a big red ball that was very shiny and round", 16)
    # Trailing spaces of the context move onto the continuation, as the harness moves them.
    assert _encode_pair(node.tokenizer, context + " ", "zoo", 128) == _encode_pair(node.tokenizer, context, " zoo", 128)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_fp32_scoring_runs_in_fp32_without_autocast(questions, device):
    node = FrozenNode.load(NodeSpec(name="llama", model="tiny:llama", role="reader"), "fp32", device, 512, logits=True)
    seen = []

    def record(module, args, output):
        seen.append((torch.is_autocast_enabled(device), output.logits.dtype))

    chunk = questions[:3]
    handle = node.model.register_forward_hook(record)
    try:
        # Even a caller's autocast (here bf16, on the node's device) does not reach the scoring forward.
        with torch.autocast(device, dtype=torch.bfloat16):
            assert node.model(torch.tensor([[1, 2, 3]], device=device)).logits.dtype == torch.bfloat16
            seen.clear()
            result = score_zero_shot(node, chunk, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert seen and set(seen) == {(False, torch.float32)}
    assert result.dtype == "float32"
    for question, prediction in zip(chunk, result.predictions):
        assert prediction["loglikelihoods"] == pytest.approx(harness_loglikelihoods(node, question), abs=2e-5)


def test_batched_scoring_of_a_4bit_node_matches_per_string_forwards(questions):
    node = FrozenNode.load(NodeSpec(name="llama", model="tiny:llama", role="reader"), "nf4", "cpu", 512, logits=True)
    chunk = questions[:6]
    result = score_zero_shot(node, chunk, batch_size=5, progress=False)   # batches mix questions and lengths
    for question, prediction in zip(chunk, result.predictions):
        direct = harness_loglikelihoods(node, question)
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
def test_run_baselines_writes_one_row_per_node(tiny_spec, tmp_path, capsys):
    from lowmem_graph.cli import main

    assert main(["baselines", "--run-dir", str(tmp_path / "out"), "--limit-train", "16", "--limit-eval", "8",
                 "--epochs", "1", "--device", "cpu", "--no-progress"]) == 0
    table = tmp_path / "out" / "baselines.md"
    assert f"written: {table}, {tmp_path / 'out' / 'baselines.json'}" in capsys.readouterr().out
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0].strip("| ") for row in rows[1:]] == [n.name for n in tiny_spec.nodes]
    report = json.loads((tmp_path / "out" / "baselines.json").read_text())
    assert report["n"] == 8 and len(report["nodes"]) == len(tiny_spec.nodes)
    assert rows[0].split(" | ")[2:5] == ["zero-shot acc", "zero-shot acc_norm", "zero-shot acc_bytes"]
    for row in report["nodes"]:
        zero = row["zero_shot"]
        assert all(0 <= zero[key] <= 1 for key in ("acc", "acc_norm", "acc_bytes")) and 0 <= row["head"]["acc"] <= 1
        assert zero["dtype"] == "float32" and zero["n"] == 8
        predictions = [json.loads(line) for line in (tmp_path / "out" / f"zero-shot-{row['node']}.jsonl").open()]
        assert zero["acc_bytes"] == sum(p["correct_bytes"] for p in predictions) / 8
        assert (tmp_path / "out" / f"head-{row['node']}" / "trainable.safetensors").is_file()
