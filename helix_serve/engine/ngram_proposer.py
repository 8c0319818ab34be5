"""Prompt-lookup (n-gram) drafting: propose the tokens that followed the latest earlier occurrence of the
sequence's own suffix in its prompt + output.

Proposals are deterministic, so the draft distribution q is one-hot at the proposed token: rejection
sampling then accepts x with probability p(x) and stays exact under any temperature/top-k/top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_serve.engine.sequence import Sequence


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
    last_tok = token_ids.gather(1, (lengths - 1).clamp(min=0)[:, None])  # [B, 1]
    ends = torch.arange(width, device=device)[None, :]
    # NOTE: only the few positions equal to the last token can end a match; extend those back sparsely.
    rows, cand = torch.nonzero((token_ids == last_tok) & (ends <= lengths[:, None] - 2), as_tuple=True)
    match_len = torch.ones_like(cand)
    run = torch.ones_like(cand, dtype=torch.bool)
    for i in range(1, max_n):
        suffix_pos = lengths[rows] - 1 - i
        ok = (cand >= i) & (suffix_pos >= 0)
        earlier = token_ids[rows, (cand - i).clamp(min=0)]
        run &= ok & (earlier == token_ids[rows, suffix_pos.clamp(min=0)])
        match_len += run
    score = torch.where(match_len >= min_n, match_len * width + cand, -1)  # longest first, then latest
    best = torch.full((num_rows,), -1, dtype=torch.long, device=device).scatter_reduce(0, rows, score, "amax")
    best_start = torch.where(best >= 0, best % width + 1, -1)  # index of the first proposed token
    offsets = best_start[:, None] + torch.arange(k, device=device)[None, :]  # [B, k]
    valid = (best_start[:, None] >= 0) & (offsets < lengths[:, None])
    drafts = token_ids.gather(1, offsets.clamp(0, width - 1)) * valid
    return drafts, valid.long().sum(-1)


def one_hot_draft_probs(draft_token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, k, V] one-hot q for deterministic proposals."""
    return torch.nn.functional.one_hot(draft_token_ids, vocab_size).float()


@dataclass(slots=True)
class NgramProposer:
    """Prompt lookup over a batch of sequences. Each sequence keeps its tokens as a tensor that grows with
    it (Sequence.token_tensor), so a step copies only the new tokens."""

    min_n: int = 1
    max_n: int = 3

    def propose(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        """Up to k proposals per sequence ([] where its suffix occurs nowhere earlier)."""
        if not seqs or k <= 0:
            return [[] for _ in seqs]
        lengths = torch.tensor([s.num_tokens for s in seqs])
        batch = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
        for row, seq in zip(batch, seqs):
            row[: seq.num_tokens] = _token_tensor(seq)
        drafts, counts = ngram_propose(batch, lengths, k, self.min_n, self.max_n)
        return [ids[:n] for ids, n in zip(drafts.tolist(), counts.tolist())]


def _token_tensor(seq: Sequence) -> torch.Tensor:
    have = seq.token_tensor
    if have is None or len(have) < seq.num_tokens:  # tokens are only ever appended
        start = 0 if have is None else len(have)
        tail = torch.tensor(seq.token_ids[start:], dtype=torch.long)
        seq.token_tensor = tail if have is None else torch.cat([have, tail])
    return seq.token_tensor
