"""Cross-tokenizer alignment by character offsets, for per-token injection.

Every node tokenizes `its own prefix + the same prompt`, so character offsets minus the prefix length index the
shared prompt. Refiner token t receives the state of the last reader token that starts before t ends: the
reader token covering t's last character, or the one just before it.

Under next-token prediction the alignment must be causal: a token may read only a source token whose state the
characters up to its own end decide. A source token's identity can depend on characters after its end (BPE and
Unigram choose a word's pieces from the whole word), so ending before the target token ends is not enough. What is
settled is every word already closed by a space: no tokenizer this reads makes a token across a space that follows
a non-space (byte-level BPE's pre-tokenizer regex starts a piece there, Metaspace splits there, WordPiece drops the
space, SentencePiece and llama2.c pieces hold a space only at their start), so the tokens that end by that space
are the same whatever comes next. `settled_chars` finds those spaces; `check_settled` refuses a tokenizer that
does make a token across one, as it would make the rule unsound.
"""
from __future__ import annotations

import torch


def prompt_spans(offsets: torch.Tensor, mask: torch.Tensor, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) in prompt characters per token; tokens outside the prompt (prefix, specials, padding) get end 0."""
    start = (offsets[..., 0] - prefix_len).clamp_min(0)
    end = offsets[..., 1] - prefix_len
    special = offsets[..., 1] <= offsets[..., 0]
    end = end.masked_fill(special | ~mask.bool() | (end <= 0), 0)
    return start, end


def word_ends(text: str) -> list[int]:
    """Positions p of `text` where a word is closed: text[p] is a space and text[p - 1] is not whitespace."""
    return [p for p in range(1, len(text)) if text[p] == " " and not text[p - 1].isspace()]


def settled_chars(texts: list[str]) -> torch.Tensor:
    """(B, L + 1): after reading c characters of text b, how many of them every tokenizer has settled: the
    position of the last word end (`word_ends`) among them, 0 if none (a word end at p is known once text[p],
    its space, is read, so at c > p). Linear in the texts' length: each word end is written once, at c = p + 1,
    and a running maximum carries it on (word ends come in increasing order)."""
    out = torch.zeros(len(texts), max(map(len, texts), default=0) + 1, dtype=torch.long)
    for b, text in enumerate(texts):
        ends = torch.tensor(word_ends(text), dtype=torch.long)
        out[b, ends + 1] = ends
    return out.cummax(1).values


def check_settled(offsets: torch.Tensor, mask: torch.Tensor, prefix_len: int, settled: torch.Tensor) -> int | None:
    """The row of the first text where a token of this tokenizer spans a word end (`settled_chars`' positions),
    or None."""
    start, end = prompt_spans(offsets, mask, prefix_len)
    last = settled.shape[1] - 1
    spans = (end > 0) & (settled.gather(1, end.clamp(max=last)) > start)     # a word end p, start < p < end
    rows = spans.any(-1).nonzero()
    return int(rows[0]) if len(rows) else None


def align_index(src_offsets, src_mask, src_prefix: int, dst_offsets, dst_mask, dst_prefix: int,
                settled: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T_dst) index into the source tokens: for each destination token, the source token to read.

    The answer is the last source prompt token that starts before the destination token ends. Destination
    tokens outside the prompt (its prefix, BOS, padding), or before any source token, read the first prompt token.
    `settled` (next-token prediction, `settled_chars` of the texts): causal, the last source token that ends
    within the characters settled when the destination token ends; where there is none the index is -1 (reads
    zeros).
    """
    s_start, s_end = prompt_spans(src_offsets, src_mask, src_prefix)
    _, d_end = prompt_spans(dst_offsets, dst_mask, dst_prefix)
    valid = s_end > 0
    positions = torch.arange(valid.shape[1])
    if settled is not None:
        limit = settled.gather(1, d_end.clamp(max=settled.shape[1] - 1))              # (B, T_dst)
        ends = torch.where(valid, s_end, 0).cummax(-1).values                          # sorted, token by token
        count = torch.searchsorted(ends, limit, right=True)     # tokens up to the last one ending by the limit
        last_valid = torch.where(valid, positions, -1).cummax(-1).values
        index = last_valid.gather(1, (count - 1).clamp_min(0))
        return torch.where((count > 0) & (limit > 0), index, -1)
    if not valid.any(-1).all():
        raise ValueError("a source sequence has no prompt tokens left after truncation")
    first = torch.where(valid, positions, valid.shape[1]).min(-1, keepdim=True).values
    before = valid[:, None, :] & (s_start[:, None, :] < d_end[:, :, None])        # (B, T_dst, T_src)
    last = torch.where(before, positions, -1).max(-1).values
    return torch.where(last >= 0, last, first)


def gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """states (B, T_src, d), index (B, T_dst) -> (B, T_dst, d); an index of -1 reads zeros."""
    index = index.to(states.device)
    out = states.gather(1, index.clamp_min(0)[..., None].expand(-1, -1, states.shape[-1]))
    return out.masked_fill((index < 0)[..., None], 0.0)
