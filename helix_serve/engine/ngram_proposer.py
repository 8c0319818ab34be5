"""Prompt-lookup (n-gram) drafting: propose the tokens that followed the latest earlier occurrence of the
sequence's own suffix in its prompt + output.

Proposals are deterministic, so the draft distribution q is one-hot at the proposed token: rejection
sampling then accepts x with probability p(x) and stays exact under any temperature/top-k/top-p.
"""

from __future__ import annotations

import torch


def ngram_propose(
    token_ids: torch.Tensor, lengths: torch.Tensor, k: int, min_n: int = 1, max_n: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest suffix match (n = max_n..min_n) per row; propose up to k tokens that followed it.

    Args:
        token_ids: [B, L] each row's prompt + output tokens, left-aligned, padded past its length.
        lengths: [B] valid tokens per row.
    Returns:
        draft_token_ids: [B, k] proposals (entries past a row's count are 0).
        num_draft_tokens: [B] proposals per row (0 when no n-gram matched).
    """
    num_rows, width = token_ids.shape
    device = token_ids.device
    positions = torch.arange(width, device=device)
    best_start = torch.full((num_rows,), -1, dtype=torch.long, device=device)  # index after the match
    for n in range(max_n, min_n - 1, -1):
        if width <= n:
            continue
        suffix_idx = (lengths[:, None] - n + torch.arange(n, device=device)[None, :]).clamp(min=0)
        suffix = token_ids.gather(1, suffix_idx)  # [B, n]
        windows = token_ids.unfold(1, n, 1)  # [B, L - n + 1, n] windows starting at each position
        match = (windows == suffix[:, None, :]).all(-1)  # [B, L - n + 1]
        starts = positions[: match.shape[1]]
        # a match must end before the suffix itself (so at least one token follows it)
        match &= (starts[None, :] + n < lengths[:, None]) & (lengths[:, None] > n)
        last = torch.where(match, starts[None, :], -1).amax(-1)  # latest occurrence
        found = (best_start < 0) & (last >= 0)
        best_start = torch.where(found, last + n, best_start)
    offsets = best_start[:, None] + torch.arange(k, device=device)[None, :]  # [B, k]
    valid = (best_start[:, None] >= 0) & (offsets < lengths[:, None])
    drafts = token_ids.gather(1, offsets.clamp(0, width - 1)) * valid
    return drafts, valid.long().sum(-1)


def one_hot_draft_probs(draft_token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, k, V] one-hot q for deterministic proposals."""
    return torch.nn.functional.one_hot(draft_token_ids, vocab_size).float()
