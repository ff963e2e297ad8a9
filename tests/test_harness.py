"""A trained graph as an lm-evaluation-harness model, run by the harness itself on local task files (JSON lines, no
network, none of the harness's own task files indexed: that takes 6 s each time): an lm run's log-likelihoods checked against a forward of each text by itself, its rolling
log-likelihood against the training loss, its generations against generate.py; a choice run's answers against
TrainedGraph.predict, and what it refuses."""
import json
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness comes with the test extra: pip install '.[test]'")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lowmem_graph.errors import UserError  # noqa: E402
from lowmem_graph.generate import generate  # noqa: E402
from lowmem_graph.harness import GraphLM, main, question_of  # noqa: E402

CHOICES = [
    {"question": "What do plants need to grow?", "choices": ["light", "a very large amount of loud music"],
     "answer": 0},
    {"question": "What is the Sun?", "choices": ["a planet", "a star", "the largest moon of Jupiter"], "answer": 1},
    {"question": "What melts ice?", "choices": ["snow", "cold", "heat from the warm air"], "answer": 2},
]
LONG = " ".join(["Plants need light and water to grow, and the Sun gives the Earth its light and heat."] * 6)
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: {kind}
"""
KINDS = {
    "lg_choice": ("choice", "multiple_choice", 'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
                  'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list: [{metric: acc}]\n'),
    "lg_next": ("text", "loglikelihood", 'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
                'target_delimiter: ""\nmetric_list: [{metric: acc}, {metric: perplexity}]\n'),
    "lg_rolling": ("text", "loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                   'metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]\n'),
    "lg_generate": ("text", "generate_until", 'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
                    'generation_kwargs: {until: ["."], max_gen_toks: 8}\nmetric_list: [{metric: exact_match}]\n'),
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, lm_graph):
    """The four request types as local tasks; lg_next's first target is what the graph writes greedily (llama,
    coupled), its second one it does not."""
    graph, _ = lm_graph
    folder = tmp_path_factory.mktemp("tasks")
    greedy = generate(graph, "Plants need", "llama", max_new_tokens=3)
    text = [{"context": "Plants need", "target": greedy, "text": "Plants need light and water to grow."},
            {"context": "The Sun is a", "target": " star.", "text": "The Sun is a star. It gives light."}]
    for name, rows in (("choice", CHOICES), ("text", text)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, (data, kind, rest) in KINDS.items():
        (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=folder / f"{data}.jsonl", kind=kind) + rest)
    return folder


class LocalTasks(TaskManager):
    """The harness's task index of our task files alone."""

    def __init__(self, *args, include_defaults=False, **kwargs):
        super().__init__(*args, include_defaults=include_defaults, **kwargs)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network, whatever the caller's environment: the hub libraries are told they are
    offline, every name lookup or connection is refused and recorded, and fails the test; the harness's command line
    indexes our task files only."""
    import socket

    import datasets.config
    import huggingface_hub.constants
    import lm_eval.tasks

    tried = []

    def refuse(address):
        tried.append(address)
        raise OSError(f"test_harness: no network ({address})")

    def connect(sock, address, *args):
        return refuse(address) if sock.family in (socket.AF_INET, socket.AF_INET6) else plain(sock, address, *args)

    plain = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: refuse(host))
    for module in (datasets.config, huggingface_hub.constants):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasks)
    yield
    assert not tried, f"tried the network: {tried}"


def run(model, tasks, names, **kwargs):
    return simple_evaluate(model=model, tasks=list(names), task_manager=LocalTasks(include_path=str(tasks)),
                           log_samples=True, **kwargs)


def reference(graph, context, continuation, node="llama", variant="coupled"):
    """(summed log-probability, all of them the argmax) of the continuation's tokens from a forward of this one
    text (through the coupled graph, or the node alone), its tokens counted as the harness's HF model counts them."""
    from lowmem_graph.objectives import final_states

    batch = graph.collate_text([context + continuation], ["one"], keep_start=False)
    with torch.no_grad():
        final = final_states(graph, variant, batch)[node][0]
        logp = graph.nodes[node].logits(final).float().log_softmax(-1)
    tok = graph.nodes[node].tokenizer
    n = len(tok(context + continuation)["input_ids"]) - len(tok(context)["input_ids"])
    row = batch.tokens[node][0][0].tolist()
    spots = range(len(row) - n, len(row))
    return sum(logp[p - 1, row[p]].item() for p in spots), all(int(logp[p - 1].argmax()) == row[p] for p in spots)


def test_the_registry_knows_lowmem_graph_and_keeps_the_harness_models():
    assert get_model("lowmem-graph") is GraphLM
    assert get_model("dummy").__name__ == "DummyLM"


def test_an_lm_run_answers_every_request_type_through_the_harness(lm_run, lm_graph, tasks):
    graph, _ = lm_graph
    out = run("lowmem-graph", tasks, KINDS, model_args={"run": str(lm_run), "node": "llama"}, batch_size=2)
    samples = out["samples"]
    # multiple choice: one loglikelihood per option, the acc the argmax of them
    right = []
    for s in samples["lg_choice"]:
        doc = s["doc"]
        lls = [r[0][0] for r in s["resps"]]
        want = [reference(graph, f"Question: {doc['question']}\nAnswer:", " " + c)[0] for c in doc["choices"]]
        assert lls == pytest.approx(want, abs=1e-4)
        right.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"]))
    assert out["results"]["lg_choice"]["acc,none"] == pytest.approx(sum(right) / len(right))
    # loglikelihood: is_greedy as a forward of the text says, true for the greedy target and not for the other
    greedy = []
    for s in samples["lg_next"]:
        ll, is_greedy = s["resps"][0][0]
        want_ll, want_greedy = reference(graph, s["doc"]["context"], s["doc"]["target"])
        assert ll == pytest.approx(want_ll, abs=1e-4) and is_greedy == want_greedy
        greedy.append(is_greedy)
    assert greedy == [True, False]
    assert out["results"]["lg_next"]["acc,none"] == 0.5
    # rolling: the text's whole log-likelihood, the training loss's NLL over it
    from lowmem_graph.edge_graph import lm_loss

    for s in samples["lg_rolling"]:
        batch = graph.collate_text([s["doc"]["text"]], ["one"])
        with torch.no_grad():
            nll, _ = lm_loss(graph.nodes["llama"], graph(batch)["llama"], batch, "llama")
        assert s["resps"][0][0] == pytest.approx(-nll.item(), abs=1e-3)
    # generation: generate.py's text, ended by the task's `until` and max_gen_toks
    for s in samples["lg_generate"]:
        assert s["resps"][0][0] == generate(graph, s["doc"]["context"], "llama", max_new_tokens=8, stop=(".",))


def test_a_long_text_rolls_over_windows_that_make_it_up(lm_run, lm_graph):
    graph, _ = lm_graph
    lm = GraphLM(run=str(lm_run), node="mistral", variant="alone")
    windows = lm.windows(LONG)
    assert len(windows) > 1 and "".join(x for _, x in windows) == LONG
    assert windows[0][0] == "" and all(c and LONG.index(c + x) >= 0 for c, x in windows[1:])
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (LONG,), 0)])
    pairs = lm.loglikelihood([Instance("loglikelihood", {}, w, 0) for w in windows])
    assert rolled == pytest.approx(sum(ll for ll, _ in pairs)) and math.isfinite(rolled)
    (alone, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("Plants need", " light"), 0)])
    assert alone == pytest.approx(reference(graph, "Plants need", " light", "mistral", "alone")[0], abs=1e-4)
    assert alone != pytest.approx(reference(graph, "Plants need", " light", "mistral")[0], abs=1e-4)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """GPT-2 (no BOS: an empty context gives it no token at all) coupled with llama both ways, unquantised so that
    the harness's own HF model can load the very weights of its node; every variant trained (one step)."""
    import yaml

    from lowmem_graph.cli import main as cli

    folder = tmp_path_factory.mktemp("gpt2")
    bridge = {"read": 2, "pooling": "token", "at": 3, "kind": "bridge"}
    (folder / "pair.yaml").write_text(yaml.safe_dump({
        "name": "gpt2_llama", "quant": "fp32", "max_length": 64,
        "nodes": [{"name": "gpt2", "model": "tiny:gpt2"}, {"name": "llama", "model": "tiny:llama"}],
        "edges": [{"from": "gpt2", "to": "llama", **bridge}, {"from": "llama", "to": "gpt2", **bridge}],
        "output": {"reads": ["gpt2", "llama"]}, "train": {"objective": "lm", "task": "openbook-facts"}}))
    assert cli(["train", "--graph", str(folder / "pair.yaml"), "--compare", "--run-dir", str(folder / "run"),
                "--epochs", "1", "--limit-train", "4", "--limit-eval", "2", "--batch-size", "4",
                "--no-progress"]) == 0
    return folder / "run"


EMPTY = [("", " Plants"), ("", " Plants need light."), ("", "Plants"), ("", " The Sun is a star."), ("", "a")]


def test_an_empty_context_starts_a_gpt2_node_from_its_end_token_as_the_harness_hf_model_does(gpt2_run):
    """The harness's HF model scores a continuation after an empty context (and a rolling text's first window)
    from the prefix token, BOS or else EOS: GPT-2's <|endoftext|>. So does a GPT-2 node, alone equal to the
    harness's own model on the same weights, and in the coupled graph and the router."""
    from lm_eval.models.huggingface import HFLM

    from lowmem_graph.tiny import tiny_path

    hf = HFLM(pretrained=str(tiny_path("gpt2")), device="cpu", batch_size=4, dtype="float32")
    texts = ["Plants need light and water to grow.", "The Sun is a star. It gives light."]
    asked = [Instance("loglikelihood", {}, pair, k) for k, pair in enumerate(EMPTY)]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), k) for k, t in enumerate(texts)]
    want, want_rolled = hf.loglikelihood(asked), hf.loglikelihood_rolling(rolling)
    lm = GraphLM(run=str(gpt2_run), node="gpt2", variant="alone")
    got = lm.loglikelihood(asked)
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
    assert lm.loglikelihood_rolling(rolling) == pytest.approx(want_rolled, abs=1e-4)
    # a context of spaces only is empty too once its spaces start the continuation (the harness's model fails there)
    (spaces, _), = lm.loglikelihood([Instance("loglikelihood", {}, (" ", "The Sun is a star."), 0)])
    assert spaces == pytest.approx(want[3][0], abs=1e-4)
    for variant in ("router", "coupled"):       # the other variants too; coupling changes the figures
        other = GraphLM(run=str(gpt2_run), node="gpt2", variant=variant)
        lls = [ll for ll, _ in other.loglikelihood(asked)]
        assert all(map(math.isfinite, lls)) and lls != pytest.approx([ll for ll, _ in want], abs=1e-4)
        rolled = other.loglikelihood_rolling(rolling)
        windows = [other.loglikelihood([Instance("loglikelihood", {}, w, 0) for w in other.windows(t)]) for t in texts]
        assert rolled == pytest.approx([sum(ll for ll, _ in w) for w in windows])


def test_the_command_line_is_the_harness_own(lm_run, tasks, capsys):
    assert main(["--model", "lowmem-graph", "--model_args", f"run={lm_run},variant=router", "--tasks", "lg_choice",
                 "--include_path", str(tasks), "--limit", "1", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "lowmem-graph ({'run': " in table and "|lg_choice|" in table.replace(" ", "")


@pytest.mark.parametrize("args", [["--help"], ["run", "-h"]])
def test_help_says_the_plain_lm_eval_command_cannot_load_the_model(args, capsys):
    from lowmem_graph.harness import NOT_PLAIN

    with pytest.raises(SystemExit) as done:
        main(args)
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith(NOT_PLAIN + "\n") and "usage: lm-eval" in out


def test_bad_model_args_are_one_line(lm_run, tasks, tmp_path, capsys):
    with pytest.raises(UserError, match=r"node=nope: choose a node the output reads \(llama, mistral\)"):
        GraphLM(run=str(lm_run), node="nope")
    with pytest.raises(UserError, match="unknown temperature"):
        GraphLM(run=str(lm_run), temperature=1)
    with pytest.raises(UserError, match="batch_size=big: give a whole number or auto"):
        GraphLM(run=str(lm_run), batch_size="big")
    assert main(["--model", "lowmem-graph", "--model_args", f"run={tmp_path / 'none'}", "--tasks", "lg_choice",
                 "--include_path", str(tasks)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lowmem-graph: error: ") and "Traceback" not in "".join(err)


def test_a_choice_run_answers_multiple_choice_and_refuses_the_rest(short_run, tasks):
    lm = GraphLM(run=str(short_run), device="cuda:0")       # the harness's default device, on a machine without one
    out = run(lm, tasks, ["lg_choice"])
    answers = lm.chooser.predict([{"question": q["question"], "choices": q["choices"]} for q in CHOICES])
    for s, a in zip(sorted(out["samples"]["lg_choice"], key=lambda s: s["doc_id"]), answers):
        probs = [math.exp(r[0][0]) for r in s["resps"]]
        assert probs == pytest.approx(list(a["probs"].values())[:len(probs)], abs=1e-6)
        assert [r[0][1] for r in s["resps"]] == [k == "ABCDE".index(a["answer"]) for k in range(len(probs))]
    right = [float("ABCDE".index(a["answer"]) == q["answer"]) for a, q in zip(answers, CHOICES)]
    assert out["results"]["lg_choice"]["acc,none"] == pytest.approx(sum(right) / len(right))
    with pytest.raises(UserError, match="lg_next document 0: one continuation: a choice run answers multiple_choice"):
        run(lm, tasks, ["lg_next"])
    with pytest.raises(UserError, match="is a choice run: it answers multiple_choice tasks only, not generate_until"):
        run(lm, tasks, ["lg_generate"])


def test_question_of_undoes_the_harness_arc_prompt():
    assert question_of("Question: What is the Sun?\nAnswer:") == {"question": "What is the Sun?", "context": ""}
    assert question_of("A passage.\nQuestion: Why?\nAnswer:") == {"question": "Why?", "context": "A passage."}
    assert question_of("The sky is") == {"question": "The sky is"}
