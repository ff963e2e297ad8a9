"""Cross-tokenizer alignment by character offsets, for per-token injection.

Every node tokenizes `its own prefix + the same prompt`, so character offsets minus the prefix length index the
shared prompt. Refiner token t receives the state of the last reader token that starts before t ends: the
reader token covering t's last character, or the one just before it.
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


def align_index(src_offsets, src_mask, src_prefix: int, dst_offsets, dst_mask, dst_prefix: int,
                causal: bool = False) -> torch.Tensor:
    """(B, T_dst) index into the source tokens: for each destination token, the source token to read.

    The answer is the last source prompt token that starts before the destination token ends. Destination
    tokens outside the prompt (its prefix, BOS, padding), or before any source token, read the first prompt token.
    `causal` (next-token prediction): the last source token that ends where the destination token ends or before,
    so no destination token sees a character beyond its own; where there is none the index is -1 (reads zeros).
    """
    s_start, s_end = prompt_spans(src_offsets, src_mask, src_prefix)
    _, d_end = prompt_spans(dst_offsets, dst_mask, dst_prefix)
    valid = s_end > 0
    if not valid.any(-1).all():
        raise ValueError("a source sequence has no prompt tokens left after truncation")
    positions = torch.arange(valid.shape[1])
    if causal:
        seen = valid[:, None, :] & (s_end[:, None, :] <= d_end[:, :, None]) & (d_end[:, :, None] > 0)
        return torch.where(seen, positions, -1).max(-1).values
    first = torch.where(valid, positions, valid.shape[1]).min(-1, keepdim=True).values
    before = valid[:, None, :] & (s_start[:, None, :] < d_end[:, :, None])        # (B, T_dst, T_src)
    last = torch.where(before, positions, -1).max(-1).values
    return torch.where(last >= 0, last, first)


def gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """states (B, T_src, d), index (B, T_dst) -> (B, T_dst, d); an index of -1 reads zeros."""
    index = index.to(states.device)
    out = states.gather(1, index.clamp_min(0)[..., None].expand(-1, -1, states.shape[-1]))
    return out.masked_fill((index < 0)[..., None], 0.0)
