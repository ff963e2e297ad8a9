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


def align_index(src_offsets, src_mask, src_prefix: int, dst_offsets, dst_mask, dst_prefix: int) -> torch.Tensor:
    """(B, T_dst) index into the source tokens: for each destination token, the source token to read.

    Source prompt tokens are contiguous (prefix first, padding last), so the answer is the first prompt token
    plus the count of prompt tokens that start before the destination token ends, minus one. Destination
    tokens outside the prompt (its prefix, BOS, padding) read the first prompt token.
    """
    s_start, s_end = prompt_spans(src_offsets, src_mask, src_prefix)
    _, d_end = prompt_spans(dst_offsets, dst_mask, dst_prefix)
    valid = s_end > 0
    if not valid.any(-1).all():
        raise ValueError("a source sequence has no prompt tokens left after truncation")
    first = valid.int().argmax(-1, keepdim=True)
    starts = s_start.masked_fill(~valid, torch.iinfo(s_start.dtype).max)
    before = (starts[:, None, :] < d_end[:, :, None]).sum(-1)
    return first + (before - 1).clamp_min(0)


def gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """states (B, T_src, d), index (B, T_dst) -> (B, T_dst, d)."""
    return states.gather(1, index.to(states.device)[..., None].expand(-1, -1, states.shape[-1]))
