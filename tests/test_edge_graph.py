"""The edge runtime: graphs of any shape, lockstep bridges, the lm objective and its baselines."""
import copy

import pytest
import torch

from lowmem_graph.align import align_index, gather_tokens, settled_chars
from lowmem_graph.edge_graph import EdgeGraph
from lowmem_graph.errors import UserError
from lowmem_graph.memory.budget import parse_size
from lowmem_graph.spec import from_dict, load_spec

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"


def _coupled_raw(**edge):
    bridge = {"read": 2, "pooling": "token", "at": 3, "kind": "bridge", **edge}
    return {"name": "pair", "max_length": 64,
            "nodes": [{"name": "llama", "model": "tiny:llama"}, {"name": "mistral", "model": "tiny:mistral"}],
            "edges": [{"from": "llama", "to": "mistral", **bridge}, {"from": "mistral", "to": "llama", **bridge}],
            "output": {"reads": ["llama", "mistral"]}}


@pytest.fixture(scope="module")
def coupled():
    """The two tiny models of examples/residual_coupling.yaml with their LM heads, coupled both ways."""
    return EdgeGraph.build(from_dict(_coupled_raw(), "pair.yaml"), "cpu", seed=0, objective="lm")


def test_three_layers_trains_end_to_end_and_the_signal_crosses_two_frozen_models(tmp_path, monkeypatch):
    from lowmem_graph.cli import main

    spec = load_spec(EXAMPLES / "three_layers.yaml")
    graph = EdgeGraph.build(spec, "cpu", seed=0)
    assert [u for u in graph.units] == [["llama"], ["qwen2"], ["gemma2"], ["mistral"]]
    from lowmem_graph.data import load_task

    batch = graph.collate(load_task("arc-easy", "train", limit=4))
    # On CUDA the injection runs the Triton op: a latent written into gemma2 is read again from mistral, so that op
    # gets readers that need a gradient (test_kernels checks its dx); here it is checked, then run by the reference.
    import lowmem_graph.kernels.inject as inject_kernels
    from lowmem_graph.ops import inject_reference

    needs_grad = []

    def triton_checked(h, xs, weights, carry, blend, **kwargs):
        inject_kernels._check(h, list(xs), list(weights), carry)
        needs_grad.append(any(x.requires_grad for x in xs))
        return inject_reference(h, xs, weights, carry, blend)

    monkeypatch.setenv("LOWMEM_GRAPH_INJECT", "triton")
    monkeypatch.setattr(inject_kernels, "fused_inject_triton", triton_checked)
    torch.nn.functional.cross_entropy(graph(batch).logits, batch.labels).backward()
    monkeypatch.undo()
    assert any(needs_grad) and not all(needs_grad)
    # the readers' maps learn through gemma2's and mistral's upper layers
    assert graph.project["0-llama-z1"].weight.grad.abs().sum() > 0
    assert graph.carry["2-z1-gemma2"].weight.grad.abs().sum() > 0
    run = tmp_path / "three"
    assert main(["train", "--graph", str(EXAMPLES / "three_layers.yaml"), "--run-dir", str(run), "--epochs", "1",
                 "--limit-train", "16", "--limit-eval", "8", "--no-progress"]) == 0
    assert (run / "trainable.safetensors").is_file() and (run / "curves.png").is_file()
    assert main(["eval", str(run), "--split", "validation", "--limit", "4", "--no-progress"]) == 0


def test_closed_gates_give_each_model_alone(coupled):
    graph = copy.deepcopy(coupled)
    with torch.no_grad():
        for gate in graph.gate.values():
            gate.fill_(-float("inf"))
    batch = graph.collate_text(["Plants need sunlight to grow.", "A magnet attracts iron nails."], ["a", "b"])
    finals = graph(batch)
    for name, node in graph.nodes.items():
        alone = node.final(*batch.tokens[name])
        mask = batch.tokens[name][1].bool()
        assert torch.allclose(finals[name][mask], alone[mask], atol=1e-5)


@pytest.fixture(scope="module")
def gpt2_pair():
    """tiny:gpt2 (byte-level BPE without BOS, learned positions) and tiny:llama, coupled both ways."""
    return EdgeGraph.build(from_dict(_gpt2_raw(), "pair.yaml"), "cpu", seed=0, objective="lm")


def _gpt2_raw():
    raw = _coupled_raw()
    raw["nodes"][1] = {"name": "mistral", "model": "tiny:gpt2"}      # the edges' names stay
    return raw


@pytest.mark.parametrize("pair", ["coupled", "gpt2_pair"])
def test_per_token_edges_stay_causal(pair, request):
    """Next-token prediction through the bridges (open), a router mixing and a per-token latent: texts cut at every
    character, each cut continued in several ways (inside a word, after a space, punctuation, a digit, non-ASCII:
    fewer than test_align's CONTINUATIONS). Every state and logit of every token that ends by the cut, and whose own
    tokens are those of the cut text, is unchanged, in both models, though they tokenize differently and read each
    other per token."""
    from test_align import agreeing, cut_texts

    from lowmem_graph.align import prompt_spans
    from lowmem_graph.objectives import Router

    coupled = request.getfixturevalue(pair)
    graph = copy.deepcopy(coupled)
    torch.manual_seed(0)
    router = Router(graph)
    with torch.no_grad():
        for gate in graph.gate.values():
            gate.fill_(3.0)             # open: the bridges carry a lot
        for gate in router.gates.values():
            torch.nn.init.normal_(gate.weight)      # the router's mix depends on every token
    texts, cuts, refs = cut_texts(["Acid breaking down substances: it's 27.5 C, naïve  café."],
                                  ["", "ubstance", " stones", "; x", "7", "\u0301水"])
    batch = graph.collate_text(texts, [str(i) for i in range(len(texts))])
    cuts = torch.tensor(cuts)
    raw = _gpt2_raw() if pair == "gpt2_pair" else _coupled_raw()
    latent = EdgeGraph(from_dict({**raw, "latents": [{"name": "z", "dim": 16}], "edges": [
        {"from": "llama", "read": 2, "pooling": "token", "to": "z"}, {"from": "z", "to": "mistral", "at": 3,
                                                                      "blend": 0.5}]}, "latent.yaml"), graph.nodes, "lm")
    with torch.no_grad():
        alone = {n: node.final(*batch.tokens[n]) for n, node in graph.nodes.items()}
        runs = {"coupled": graph(batch), "router": router(alone, batch), "per-token latent": latent(batch)}
    for name, node in graph.nodes.items():
        (ids, mask), offsets = batch.tokens[name], batch.offsets[name]
        _, end = prompt_spans(offsets, mask, len(node.spec.prefix))
        own = agreeing({"input_ids": ids, "attention_mask": mask, "offset_mapping": offsets}, refs)
        kept = (end > 0) & (end <= cuts[:, None]) & (torch.arange(end.shape[1]) < own[:, None])
        assert kept.sum() > 3_000
        for variant, finals in runs.items():
            got, want = finals[name][kept], finals[name][refs][kept]
            if variant != "per-token latent" or name == "mistral":     # the other model reaches these tokens
                assert (got - alone[name][kept]).abs().max() > 0.1, (variant, name)
            assert torch.allclose(got, want, atol=1e-5), (variant, name)
            assert torch.allclose(node.logits(got), node.logits(want), atol=1e-4), (variant, name)


def test_text_over_max_length_keeps_its_start_under_the_lm_objective(coupled):
    """A passage longer than max_length loses its end, not its middle: which tokens a model sees never depends on
    how the text goes on (a prompt for multiple choice keeps its end, where the options sit)."""
    text = " ".join(["Plants need sunlight and water to grow tall."] * 8)
    batch = coupled.collate_text([text, text + " And so on."], ["a", "b"])
    for name, node in coupled.nodes.items():
        ids, mask = batch.tokens[name]
        assert mask.sum(-1).tolist() == [node.max_length] * 2
        assert ids[0].tolist() == ids[1].tolist() == node.tokenizer(text)["input_ids"][:node.max_length]


def test_causal_alignment_never_reads_ahead():
    # source tokens "The|mo|on" against destination tokens "Th|e|moon" in "The moon": a destination token reads the
    # last source token of the words closed by a space it has read. "moon" may not read "on": had the text gone on
    # "moons", the source could have split the word otherwise. "Th" and "e" read nothing (-1, zeros).
    src = torch.tensor([[[0, 3], [4, 6], [6, 8]]])
    dst = torch.tensor([[[0, 2], [2, 3], [4, 8]]])
    ones = torch.ones(1, 3, dtype=torch.long)
    index = align_index(src, ones, 0, dst, ones, 0, settled_chars(["The moon"]))
    assert index.tolist() == [[-1, -1, 0]]
    states = torch.arange(6.0).view(1, 3, 2) + 1
    assert gather_tokens(states, index).tolist() == [[[0, 0], [0, 0], [1, 2]]]
    assert align_index(src, ones, 0, dst, ones, 0).tolist() == [[0, 0, 2]]     # not causal: the pooled rule


def test_bridges_and_objectives_are_checked():
    with pytest.raises(UserError, match="writes above the layer it reads"):
        from_dict(_coupled_raw(read=3, at=3), "pair.yaml")
    spec = from_dict(_coupled_raw(read=-1, at=4), "pair.yaml")       # -1 is layer 4 of 4: refused at build
    with pytest.raises(UserError, match="reads layer 4 and writes at layer 4"):
        EdgeGraph.build(spec, "cpu")
    with pytest.raises(UserError, match="pooling mean sees the whole text"):
        EdgeGraph.build(from_dict(_coupled_raw(pooling="mean"), "pair.yaml"), "cpu", objective="lm")


def test_lm_compares_coupling_with_each_model_alone_and_a_router(tmp_path, capsys):
    """examples/residual_coupling.yaml under one protocol: the three variants run, their figures are written, and
    training lowers the perplexity below the frozen models'."""
    import json

    from lowmem_graph.cli import main

    run = tmp_path / "rc"
    assert main(["train", "--graph", str(EXAMPLES / "residual_coupling.yaml"), "--compare", "--run-dir", str(run),
                 "--epochs", "1", "--limit-train", "48", "--limit-eval", "16", "--no-progress"]) == 0
    results = json.loads((run / "lm-results.json").read_text())
    assert list(results) == ["alone", "router", "coupled"]
    assert results["alone"]["trainable"] == 0 and results["coupled"]["trainable"] == 2 * 64 * 128 + 2
    for node in ("llama", "mistral"):
        assert results["coupled"]["perplexity"][node] < results["alone"]["perplexity"][node]
        assert results["router"]["perplexity"][node] < results["alone"]["perplexity"][node]
    closed = float(torch.sigmoid(torch.tensor(-2.0)))
    assert all(abs(g - closed) > 1e-6 for g in results["coupled"]["gates"].values())      # the gates learned
    assert (run / "lm-comparison.png").stat().st_size > 5_000
    assert (run / "weights-coupled.safetensors").is_file() and (run / "weights-router.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in records} == {"alone", "router", "coupled"}
    assert (run / "lm-curves.png").stat().st_size > 5_000
    # the run folder answers the usual commands: eval gives the coupled graph's perplexity again, figures redraws,
    # predict says why it cannot
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "validation", "--limit", "16", "--no-progress"]) == 0
    said = capsys.readouterr().out
    for node in ("llama", "mistral"):
        assert f"{node} {results['coupled']['perplexity'][node]:.2f}" in said
    (run / "lm-curves.png").unlink()
    assert main(["figures", str(run)]) == 0 and (run / "lm-curves.png").is_file()
    assert main(["predict", str(run), "--question", "Is it?", "--choices", "yes", "no"]) == 2


def test_the_prefix_cache_keeps_what_lies_below_each_nodes_lowest_incoming_edge(tmp_path, coupled):
    """Readers' reads, and every steered node's stream entering its lowest written layer, are input-only: the
    frozen pass caches them, and a step from the cache gives what a step without it does."""
    from lowmem_graph.cache import PrefixCache
    from lowmem_graph.data import load_task
    from lowmem_graph.questions import format_prompt
    from lowmem_graph.frozen_pass import run_frozen_pass

    cache = PrefixCache(tmp_path)
    three = EdgeGraph.build(load_spec(EXAMPLES / "three_layers.yaml"), "cpu", seed=0)
    assert {n: three.frozen_parts(n) for n in three.nodes} == {
        "llama": [("mean", 3)], "qwen2": [("mean", 3)], "gemma2": [("prefix", 2)], "mistral": [("prefix", 2)]}
    questions = load_task("arc-easy", "train", limit=6)
    states = run_frozen_pass(three, [(q.id, format_prompt(q)) for q in questions], cache, 4, False)
    batch = three.collate(questions)
    plain, cached = three(batch).logits, three(batch, *states.for_batch(three, batch)).logits
    finite = torch.isfinite(plain)
    assert torch.allclose(plain[finite], cached[finite], atol=1e-6) and torch.equal(finite, torch.isfinite(cached))

    assert coupled.frozen_parts("llama") == [("prefix", 2), ("tokens", 1)]     # bridges read 2, write 3
    items = [("a", "Plants need light to grow."), ("b", "Iron is a metal that rusts in water.")]
    states = run_frozen_pass(coupled, items, cache, 4, False)
    batch = coupled.collate_text([t for _, t in items], [i for i, _ in items])
    plain, cached = coupled(batch), coupled(batch, *states.for_batch(coupled, batch))
    for name in coupled.nodes:
        real = batch.tokens[name][1].bool()
        assert torch.equal(plain[name][real], cached[name][real])
    assert len(list(tmp_path.iterdir())) == 4 + 4       # one entry per part; the second pass reuses them
    run_frozen_pass(coupled, items, cache, 4, False)
    assert len(list(tmp_path.iterdir())) == 8


def _forced_plan(spec, resident_stepped=(2,)):
    """The tiny pair fits any budget whole, so the plan is forced: at a step each node's layers 2 and 3 (a bridge
    writes at 3, so layer 3 starts a group) in groups of one, `resident_stepped` on the device and the rest streamed;
    in the frozen pass layer 0 resident and layer 1 streamed; micro-batches of 4."""
    import dataclasses

    from lowmem_graph.memory import search as planning
    from lowmem_graph.memory.estimate import FrozenPlacement, GroupPlan

    real = planning.make_plan(spec, parse_size("1G"), 8, spec.max_length)
    groups = [GroupPlan(n, i, i + 1, 0, resident=i in resident_stepped) for n in ("llama", "mistral") for i in (2, 3)]
    frozen = {name: FrozenPlacement([GroupPlan(name, i, i + 1, 0, resident=i == 0) for i in (0, 1)], 2,
                                    placed.breakdown) for name, placed in real.frozen.items()}
    return dataclasses.replace(real, groups=groups, micro_batch=4, prefetch_depth=2, frozen=frozen)


def test_a_coupled_pair_streams_in_lockstep_and_learns_what_it_learns_whole(tmp_path, monkeypatch, streamers_made):
    """Residual Coupling under a memory plan: both nodes on the host, their frozen layers streamed through the
    frozen pass, their upper layers (in lockstep, a bridge each way) checkpointed in groups that start where a
    bridge writes, one resident and one streamed per node, micro-batches of 4: the same losses and perplexities as
    the run with everything on the device."""
    import json

    from lowmem_graph.lm import train_lm
    from lowmem_graph.memory import search as planning
    from lowmem_graph.train import TrainConfig

    spec = load_spec(EXAMPLES / "residual_coupling.yaml")
    assert planning.make_plan(spec, parse_size("1G"), 8, 128).groups[0].first == 2   # the plan starts at 2
    forced = _forced_plan(spec)
    monkeypatch.setattr(planning, "make_plan", lambda *a, **k: forced)
    made = streamers_made
    base = {**spec.train, "limit_train": 24, "limit_eval": 8, "epochs": 1, "batch_size": 8}
    quiet = dict(progress=False, log=lambda *_: None)
    planned = train_lm(spec, TrainConfig.from_dict({**base, "gpu_mem": "1G", "cache_dir": str(tmp_path / "c1")}),
                       tmp_path / "planned", **quiet)
    steps = [s for s in made if s.checkpoint.groups[0][0] == 2]
    frozen = [s for s in made if s not in steps]
    assert len(steps) == 2 and all(s.loads > 0 and s.slots == [] for s in steps)     # one per node, released
    assert all(s.loads > 0 for s in frozen) and len(frozen) >= 2
    plain = train_lm(spec, TrainConfig.from_dict({**base, "cache_dir": str(tmp_path / "c2")}), tmp_path / "plain",
                     **quiet)

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    torch.testing.assert_close(losses(tmp_path / "planned"), losses(tmp_path / "plain"), rtol=1e-4, atol=1e-5)
    for node in ("llama", "mistral"):
        assert planned["coupled"]["perplexity"][node] == pytest.approx(plain["coupled"]["perplexity"][node], rel=1e-4)


def test_lm_heads_go_to_the_device_for_steps_only_and_come_back(coupled, monkeypatch):
    """A frozen pass has no use for a node's LM head (tied, it is the whole embedding table); steps of the lm
    objective do, and `stop_steps` gives it back with the norms and rotary tables."""
    from lowmem_graph.memory.placement import Placement

    moved = []
    to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda m, *a, **k: moved.append(m) or to(m, *a, **k))
    placement = Placement("cpu", _forced_plan(load_spec(EXAMPLES / "residual_coupling.yaml")))
    heads = {id(node.model.get_output_embeddings()) for node in coupled.nodes.values()}
    norms = {id(node.norm) for node in coupled.nodes.values()}
    with placement.frozen_pass(coupled.nodes["llama"], needed=2):
        pass
    assert norms & {id(m) for m in moved} and not heads & {id(m) for m in moved}
    moved.clear()
    placement.start_steps(coupled)
    assert [id(m) for m in moved if id(m) in heads] and len(placement.streamers) == 2
    placement.stop_steps()
    assert sorted(id(m) for m in moved if id(m) in heads) == sorted(2 * list(heads))     # there and back
    assert all(node.device == torch.device("cpu") for node in coupled.nodes.values()) and not placement.streamers


def test_the_planner_plans_each_node_from_its_lowest_incoming_edge():
    """The plan places the layers a step runs (from each node's lowest written layer to its highest read), with
    groups cut where an edge reads or writes, and the frozen pass of the layers below."""
    from lowmem_graph.memory.search import _split, make_plan

    assert [(g.first, g.last) for g in _split("n", [1] * 8, 2, 8, 4, cuts=(3, 6))] == [(2, 3), (3, 6), (6, 8)]
    three = make_plan(load_spec(EXAMPLES / "three_layers.yaml"), parse_size("1G"), 8, 192)
    assert {(g.node, g.first) for g in three.groups} == {("gemma2", 2), ("mistral", 2)}    # readers: cache only
    assert {name: p.groups[-1].last for name, p in three.frozen.items()} == {
        "llama": 4, "qwen2": 4, "gemma2": 2, "mistral": 2}
    raw = _coupled_raw(read=3, at=4)        # a bridge reads layer 3 and writes at 4, a second one at 3 ...
    raw["edges"].append({"from": "llama", "to": "mistral", "read": 1, "at": 3, "kind": "bridge",
                         "pooling": "token"})
    pair = make_plan(from_dict(raw, "pair.yaml"), parse_size("1G"), 8, 64)
    cuts = {(g.node, g.first) for g in pair.groups}
    assert ("mistral", 2) in cuts and ("mistral", 3) in cuts and ("llama", 3) in cuts    # ... each starts a group
    assert {g.node for g in pair.groups} == {"llama", "mistral"}      # lockstep nodes sized together
