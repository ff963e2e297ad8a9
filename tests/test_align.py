"""Per-token injection across different tokenizers: alignment by character offsets."""
from dataclasses import replace

import pytest
import torch

from lowmem_graph.align import align_index, check_settled, prompt_spans, settled_chars, word_ends
from lowmem_graph.questions import format_prompt
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


# ---- causal alignment (next-token prediction) -----------------------------------------------------------------
# Texts cut at every character, each cut followed by continuations of every kind: inside a word, after a space,
# punctuation, a digit, non-ASCII (a precomposed letter, a combining accent that changes the letter before it, CJK).
CAUSAL_BASES = ["An example of a chemical change is acid breaking down substances.",
                "It's 27.5 C; the moon  orbits Earth, naïve café-goers say.\nOk"]
CONTINUATIONS = ["", "stones", "ubstance", "s.", " and more", ", then", "7 days", "\u00e9t\u00e9", "\u0301 x", "水"]


def cut_texts(bases=CAUSAL_BASES, continuations=CONTINUATIONS) -> tuple[list[str], list[int], list[int]]:
    """(texts, the cut of each, the row of its reference: the same cut with nothing after it)."""
    texts, cuts, refs = [], [], []
    for base in bases:
        for c in range(1, len(base) + 1):
            ref = len(texts)
            for cont in continuations:
                texts.append(base[:c] + cont)
                cuts.append(c)
                refs.append(ref)
    return texts, cuts, refs


def agreeing(enc: dict, refs: list[int]) -> torch.Tensor:
    """(B,): how many leading tokens of each row equal (ids and offsets) its reference row's."""
    ids, offsets, mask = enc["input_ids"], enc["offset_mapping"], enc["attention_mask"].bool()
    same = (ids == ids[refs]) & (offsets == offsets[refs]).all(-1) & mask & mask[refs]
    return same.long().cumprod(-1).sum(-1)


@pytest.fixture(scope="module")
def stories_node():
    from lowmem_graph.nodes import FrozenNode
    from lowmem_graph.spec import NodeSpec

    from conftest import shared_data

    path = shared_data() / "models/stories260K/stories260K.bin"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return FrozenNode.load(NodeSpec(name="stories", model=str(path), prefix="Once upon a time. "), "fp32", "cpu", 256)


def test_causal_alignment_reads_only_what_the_characters_so_far_decide(tiny_nodes, stories_node):
    """For every pair of tokenizers (byte-level BPE, with BOS and without as GPT-2's, Metaspace BPE and Unigram,
    WordPiece, llama2.c's), every cut and continuation: a destination token ending by the cut, whose own tokens are those of the cut text (else it is
    a different token: its own tokenizer's business, as in any LM), reads the same source token, and every source
    token up to the one it reads (what that token's state depends on) is the same as in the cut text."""
    from lowmem_graph.nodes import FrozenNode
    from lowmem_graph.spec import NodeSpec

    gpt2 = FrozenNode.load(NodeSpec(name="gpt2", model="tiny:gpt2"), "fp32", "cpu", 256)
    nodes = {**tiny_nodes, "stories": stories_node, "gpt2": gpt2}
    texts, cuts, refs = cut_texts()
    settled = settled_chars(texts)
    enc = {n: node.encode(texts, offsets=True, keep_start=True) for n, node in nodes.items()}
    agree = {n: agreeing(e, refs) for n, e in enc.items()}
    cuts = torch.tensor(cuts)
    checked = 0
    for s, t in [(s, t) for s in nodes for t in nodes if s != t]:
        prefix = {n: len(nodes[n].spec.prefix) for n in (s, t)}
        index = align_index(enc[s]["offset_mapping"], enc[s]["attention_mask"], prefix[s],
                            enc[t]["offset_mapping"], enc[t]["attention_mask"], prefix[t], settled)
        _, d_end = prompt_spans(enc[t]["offset_mapping"], enc[t]["attention_mask"], prefix[t])
        positions = torch.arange(index.shape[1])
        compared = (d_end > 0) & (d_end <= cuts[:, None]) & (positions < agree[t][:, None])
        assert (index[compared] == index[refs][compared]).all(), (s, t)
        assert (index[compared] < agree[s][:, None].expand_as(index)[compared]).all(), (s, t)
        assert (index[compared] >= 0).any()
        checked += int(compared.sum())
        assert check_settled(enc[s]["offset_mapping"], enc[s]["attention_mask"], prefix[s], settled) is None
    assert checked > 100_000


def _settled_by_definition(text: str, length: int) -> list[int]:
    """After c characters: the last p < c with text[p] a space and text[p - 1] not whitespace (0 if none), found
    by looking back from each c, without word_ends."""
    out = []
    for c in range(length + 1):
        p = min(c, len(text)) - 1
        while p >= 1 and not (text[p] == " " and not text[p - 1].isspace()):
            p -= 1
        out.append(max(p, 0))
    return out


def test_settled_characters_match_their_definition_over_many_texts():
    import random

    rng = random.Random(0)
    alphabet = ["a", "Z", "7", ".", "'", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000", "\u00e9", "e\u0301", "水",
                "🙂"]
    texts = ["", " ", "  ", "a", " a", "a ", "a  b", "\n a", "\u00a0 x", "\u3000 x", "ab cd  ef\n gh"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(400)]
    texts += [base[:c] for base in CAUSAL_BASES for c in range(len(base) + 1)]        # cut mid-word and everywhere
    for group in (texts, texts[:1], texts[::7], [t for t in texts if t.strip()], ["", ""]):
        settled = settled_chars(group)
        width = settled.shape[1] - 1
        assert width == max(map(len, group))
        assert settled.tolist() == [_settled_by_definition(t, width) for t in group]


def test_settled_characters_take_linear_time():
    """A long text with a word end every two characters: written once each, not once per later character (that
    was about 10^10 writes here, minutes)."""
    import time

    text = "a " * 100_000
    started = time.perf_counter()
    settled = settled_chars([text, ""])
    assert time.perf_counter() - started < 5.0
    assert settled[0, -1] == len(text) - 1 and settled[1].max() == 0 and settled[0, 3] == 1


def test_settled_characters_are_those_of_closed_words():
    assert word_ends("ab cd  ef\n gh") == [2, 5]
    assert settled_chars(["ab cd  ef\n gh", "x"]).tolist() == [
        [0, 0, 0, 2, 2, 2, 5, 5, 5, 5, 5, 5, 5, 5], [0] * 14]
    # a token across a closed word ("b c") makes the rule unsound: refused
    offsets = torch.tensor([[[0, 1], [1, 4], [4, 5]]])
    settled = settled_chars(["ab cd"])
    assert check_settled(offsets, torch.ones(1, 3, dtype=torch.long), 0, settled) == 0
    assert check_settled(torch.tensor([[[0, 2], [2, 5]]]), torch.ones(1, 2, dtype=torch.long), 0, settled) is None
