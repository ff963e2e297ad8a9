"""The paper's forward pass: blend formula, gradients across frozen 4-bit boundaries, what trains."""
import hashlib

import pytest
import torch

from lowmem_graph.errors import UserError
from lowmem_graph.ops import inject_reference
from lowmem_graph.summary import describe


def test_blend_is_norm_matched():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 12)
    xs, ws = [torch.randn(2, 6), torch.randn(2, 4)], [torch.randn(8, 6), torch.randn(8, 4)]
    carry = torch.randn(12, 8)
    out = inject_reference(h, xs, ws, carry, 0.25)
    z = (xs[0] @ ws[0].t() + xs[1] @ ws[1].t()) / 2
    u = z @ carry.t()
    expected = 0.75 * h + 0.25 * (u / u.norm(dim=-1, keepdim=True))[:, None] * h.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, expected)
    assert torch.equal(inject_reference(h, xs, ws, carry, 0.0), h)


def test_gradients_reach_reader_projections_through_4bit_refiners(tiny_graph, questions):
    batch = tiny_graph.collate(questions[:4])
    out = tiny_graph(batch)
    assert out.logits.shape == (4, tiny_graph.spec.output.max_choices)
    assert torch.isinf(out.logits[0, len(questions[0].choices):]).all()    # slots past the choices are masked
    torch.testing.assert_close(out.routing.sum(-1), torch.ones(4))
    torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
    for name, p in tiny_graph.named_parameters():
        if name.startswith(("project", "readout")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = [p for node in tiny_graph.nodes.values() for p in node.model.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    trainable = {id(p) for p in tiny_graph.parameters()}
    assert not trainable & {id(p) for p in frozen}


def _digest(nodes):
    h = hashlib.sha256()
    for node in nodes.values():
        for name, t in node.frozen_tensors():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_frozen_weights_are_bit_identical_after_training(tiny_graph, questions):
    before = _digest(tiny_graph.nodes)
    opt = torch.optim.AdamW(tiny_graph.parameters(), lr=1e-2)
    first = None
    for step in range(3):
        batch = tiny_graph.collate(questions[4 * step: 4 * step + 4])
        loss = torch.nn.functional.cross_entropy(tiny_graph(batch).logits, batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else {k: v.clone() for k, v in tiny_graph.state_dict().items()}
    assert _digest(tiny_graph.nodes) == before
    assert any(not torch.equal(first[k], v) for k, v in tiny_graph.state_dict().items())


def test_state_dict_holds_only_trainable_parts(tiny_graph):
    keys = tiny_graph.state_dict().keys()
    assert all(k.startswith(("project.", "readout.", "output.")) for k in keys)


def test_mismatched_widths_are_refused(tiny_graph):
    state = tiny_graph.trainable_state()
    state["project.0-llama-z.weight"] = torch.zeros(32, 65)
    with pytest.raises(UserError, match="mismatched widths"):
        tiny_graph.load_trainable(state, "weights.safetensors")


def test_separate_carry_adds_a_matrix_per_refiner(tiny_spec, tiny_nodes, questions):
    from dataclasses import replace

    from lowmem_graph.edge_graph import EdgeGraph

    graph = EdgeGraph(replace(tiny_spec, carry="separate"), tiny_nodes)
    assert set(graph.carry) == {"3-z-phi3", "4-z-mistral"}
    batch = graph.collate(questions[:2])
    torch.nn.functional.cross_entropy(graph(batch).logits, batch.labels).backward()
    assert graph.carry["3-z-phi3"].weight.grad.abs().sum() > 0
    # weights saved under the paper shape's former names load into the edge names
    former = {k.replace("project.0-llama-z.", "read_proj.llama.").replace("carry.3-z-phi3.", "carry.phi3."): v
              for k, v in graph.trainable_state().items()}
    assert "read_proj.llama.weight" in former and "carry.phi3.weight" in former
    again = EdgeGraph(replace(tiny_spec, carry="separate"), tiny_nodes)
    again.load_trainable(former, "old run")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), graph.state_dict().values()))


def test_paper_graph_counts_from_meta_configs():
    from lowmem_graph.spec import load_preset

    shapes, parts = describe(load_preset("paper"))
    assert [s.width for s in shapes.values()] == [2048, 1536, 2304, 3072, 4096]
    assert sum(s.params for s in shapes.values()) == pytest.approx(16.46e9, rel=1e-3)
    # five bias-free 1024-wide matrices (13.37M) + the cross-attention output node (4.21M)
    assert sum(v for k, v in parts.items() if k != "output") == 1024 * (2048 + 1536 + 2304 + 3072 + 4096)
    assert sum(parts.values()) == pytest.approx(17.6e6, rel=0.01)
