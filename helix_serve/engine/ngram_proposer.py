"""Prompt-lookup (n-gram) drafting: propose the tokens that followed the latest earlier occurrence of the
sequence's own suffix in its prompt + output.

Proposals are deterministic, so the draft distribution q is one-hot at the proposed token: rejection
sampling then accepts x with probability p(x) and stays exact under any temperature/top-k/top-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
class NgramIndex:
    """One sequence's n-grams (n = min_n..max_n), each mapped to the position of its latest last token.

    Grown by the new tokens only. At length L it holds the n-grams ending at positions <= L - 2: the
    earlier occurrences a suffix can match (the suffix itself ends at L - 1).
    """

    min_n: int
    max_n: int
    latest: dict[tuple[int, ...], int] = field(default_factory=dict)
    num_indexed: int = 0  # the n-grams ending before this position are in `latest`

    def update(self, token_ids: list[int]) -> None:
        latest, end = self.latest, len(token_ids) - 1
        for pos in range(self.num_indexed, end):  # n-grams ending at pos, later positions overwriting
            for n in range(self.min_n, min(self.max_n, pos + 1) + 1):
                latest[tuple(token_ids[pos - n + 1 : pos + 1])] = pos
        self.num_indexed = max(self.num_indexed, end)

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        self.update(token_ids)
        length = len(token_ids)
        for n in range(min(self.max_n, length), self.min_n - 1, -1):
            pos = self.latest.get(tuple(token_ids[length - n :]))
            if pos is not None:
                return token_ids[pos + 1 : min(pos + 1 + k, length)]
        return []


@dataclass(slots=True)
class NgramProposer:
    """Prompt lookup over a batch of sequences. Each sequence keeps an index of its n-grams that grows with
    it (Sequence.ngram_index), so a step costs O(new tokens), not O(history); it proposes what
    `ngram_propose` (the batched reference) would."""

    min_n: int = 1
    max_n: int = 3

    def propose(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        """Up to k proposals per sequence ([] where its suffix occurs nowhere earlier)."""
        if k <= 0:
            return [[] for _ in seqs]
        return [self._index(seq).propose(seq.token_ids, k) for seq in seqs]

    def _index(self, seq: Sequence) -> NgramIndex:
        index = seq.ngram_index
        if index is None or (index.min_n, index.max_n) != (self.min_n, self.max_n):
            index = seq.ngram_index = NgramIndex(self.min_n, self.max_n)
        return index
