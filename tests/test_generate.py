"""Generation by an lm run's graph: greedy through the coupled graph (its bridges matter; shut, it writes what the
model alone writes), stop strings, sampling, and the command streaming to the terminal."""
import pytest
import torch

from lowmem_graph.errors import UserError
from lowmem_graph.generate import generate, next_token

PROMPT = "Plants need"


def test_next_token_keeps_to_top_k_and_top_p_and_is_the_argmax_at_temperature_0():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, 0.0, None, 1.0, g) == 3
    assert {next_token(logits, 1.0, 2, 1.0, g) for _ in range(200)} == {2, 3}
    # softmax: 0.032, 0.087, 0.237, 0.644: the smallest set holding 0.8 is {3, 2}; holding 0.5, {3}
    assert {next_token(logits, 1.0, None, 0.8, g) for _ in range(200)} == {2, 3}
    assert {next_token(logits, 1.0, None, 0.5, g) for _ in range(50)} == {3}
    assert len({next_token(logits, 1.0, None, 1.0, g) for _ in range(400)}) == 4


def test_greedy_writes_through_the_bridges_and_with_them_shut_as_the_model_alone(lm_graph):
    graph, routers = lm_graph
    pieces = []
    coupled = generate(graph, PROMPT, "llama", max_new_tokens=6, on_text=pieces.append)
    assert "".join(pieces) == coupled and coupled
    batch = graph.collate_text([PROMPT], ["p"])          # the first token: the coupled graph's argmax after the prompt
    with torch.no_grad():
        first = int(graph.nodes["llama"].logits(graph(batch)["llama"][0, -1]).argmax())
    tok = graph.nodes["llama"].tokenizer
    base = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert coupled.startswith(tok.decode(base + [first])[len(tok.decode(base)):])
    alone = generate(graph, PROMPT, "llama", "alone", max_new_tokens=6)
    assert alone != coupled
    saved = {k: g.detach().clone() for k, g in graph.gate.items()}
    try:
        with torch.no_grad():
            for g in graph.gate.values():
                g.fill_(-1e4)                               # sigmoid: 0, no update goes in
        assert generate(graph, PROMPT, "llama", max_new_tokens=6) == alone
    finally:
        with torch.no_grad():
            for k, g in graph.gate.items():
                g.copy_(saved[k])


def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed(lm_graph):
    graph, _ = lm_graph
    full = generate(graph, PROMPT, "mistral", max_new_tokens=8)
    stop = full[3:5]
    assert len(stop) == 2 and full.find(stop) >= 1
    pieces = []
    cut = generate(graph, PROMPT, "mistral", max_new_tokens=8, stop=("never there", stop), on_text=pieces.append)
    assert cut == full[:full.find(stop)] and "".join(pieces) == cut


def test_sampling_follows_its_seed(lm_graph):
    graph, routers = lm_graph
    once = generate(graph, PROMPT, "llama", "router", routers["router"], max_new_tokens=4, temperature=1.0, seed=1)
    assert generate(graph, PROMPT, "llama", "router", routers["router"], max_new_tokens=4, temperature=1.0,
                    seed=1) == once
    others = {generate(graph, PROMPT, "llama", "router", routers["router"], max_new_tokens=4, temperature=1.0,
                       seed=s) for s in (2, 3)}
    assert others != {once}
    greedy = generate(graph, PROMPT, "llama", "router", routers["router"], max_new_tokens=4)
    assert generate(graph, PROMPT, "llama", "router", routers["router"], max_new_tokens=4, temperature=1.0,
                    top_k=1, seed=5) == greedy
    with pytest.raises(UserError, match="does not write"):
        generate(graph, PROMPT, "nobody")
    with pytest.raises(UserError, match="--stop is empty"):
        generate(graph, PROMPT, stop=("",))


def test_the_command_streams_the_prompt_and_the_text(lm_run, lm_graph, capsys):
    from lowmem_graph.cli import main

    graph, _ = lm_graph
    want = generate(graph, PROMPT, "llama", max_new_tokens=3)
    capsys.readouterr()
    assert main(["generate", str(lm_run), "--prompt", PROMPT, "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == PROMPT + want + "\n"
    assert main(["generate", str(lm_run), "--prompt", PROMPT, "--variant", "sideways"]) == 2
    assert "no variant 'sideways'" in capsys.readouterr().err
