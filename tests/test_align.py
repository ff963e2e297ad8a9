"""Per-token injection across different tokenizers: alignment by character offsets."""
from dataclasses import replace

import torch

from lowmem_graph.align import align_index, prompt_spans
from lowmem_graph.data import format_prompt
from lowmem_graph.edge_graph import EdgeGraph


def test_alignment_rule_on_hand_made_offsets():
    # prompt "ab cd": source tokens [BOS][pfx][ab][ cd][pad]; destination [pfx][a][b][ c][d]
    src = torch.tensor([[[0, 0], [0, 3], [3, 5], [5, 8], [0, 0]]])
    src_mask = torch.tensor([[1, 1, 1, 1, 0]])
    dst = torch.tensor([[[0, 2], [2, 3], [3, 4], [4, 6], [6, 7]]])
    dst_mask = torch.ones(1, 5, dtype=torch.long)
    index = align_index(src, src_mask, 3, dst, dst_mask, 2)
    assert index.tolist() == [[2, 2, 2, 3, 3]]


def test_every_refiner_token_reads_the_reader_token_covering_its_end(tiny_nodes, questions):
    texts = [format_prompt(q) for q in questions[:4]]
    for r, j in [("llama", "phi3"), ("gemma2", "mistral"), ("qwen2", "mistral")]:
        rn, jn = tiny_nodes[r], tiny_nodes[j]
        a, b = rn.encode(texts, offsets=True), jn.encode(texts, offsets=True)
        index = align_index(a["offset_mapping"], a["attention_mask"], len(rn.spec.prefix),
                            b["offset_mapping"], b["attention_mask"], len(jn.spec.prefix))
        s_start, s_end = prompt_spans(a["offset_mapping"], a["attention_mask"], len(rn.spec.prefix))
        _, d_end = prompt_spans(b["offset_mapping"], b["attention_mask"], len(jn.spec.prefix))
        assert index.shape == b["input_ids"].shape
        for bi in range(len(texts)):
            for t in range(index.shape[1]):
                if d_end[bi, t] == 0:
                    continue
                i = index[bi, t]
                assert s_end[bi, i] > 0 and s_start[bi, i] < d_end[bi, t]          # starts before t ends
                later = (s_end[bi] > 0) & (torch.arange(len(s_end[bi])) > i)
                assert (s_start[bi][later] >= d_end[bi, t]).all()                   # and is the last such
        assert not torch.equal(a["input_ids"][0][:10], b["input_ids"][0][:10])   # the tokenizers really differ


def test_token_injection_trains_through_frozen_refiners(tiny_spec, tiny_nodes, questions):
    torch.manual_seed(0)
    graph = EdgeGraph(replace(tiny_spec, injection="token"), tiny_nodes)
    assert {graph.frozen_parts(r)[0][0] for r in ("llama", "qwen2", "gemma2")} == {"tokens"}
    batch = graph.collate(questions[:3])
    out = graph(batch)
    torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in graph.project.parameters())
    pooled = EdgeGraph(tiny_spec, tiny_nodes)
    pooled.load_state_dict(graph.state_dict())
    assert not torch.allclose(pooled(pooled.collate(questions[:3])).logits, out.logits)


def test_zero_length_tokens_inside_the_prompt_do_not_shift_the_alignment():
    src = torch.tensor([[[0, 0], [0, 2], [2, 2], [2, 4]]])
    dst = torch.tensor([[[0, 4]]])
    index = align_index(src, torch.ones(1, 4, dtype=torch.long), 0, dst, torch.ones(1, 1, dtype=torch.long), 0)
    assert index.tolist() == [[3]]
