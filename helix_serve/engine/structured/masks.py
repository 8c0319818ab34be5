"""A step's grammar masks: at every position a speculative step scores (each draft position of the draft model
and the target's K + 1 positions) the tokens the grammar forbids after that position's prefix get logit −inf.

The prefix of position j of a sequence is its emitted tokens plus the step's first j draft tokens. Each
constrained sequence gets a fork of its matcher that advances along its draft tokens as positions are asked
for, and every mask is computed once per step (the draft pass and the target pass share them). The sequence's
own matcher advances only by emitted tokens, after the step (llm_engine), so rejected drafts need no rollback.

Exactness: p and q are both masked, so rejection sampling emits samples of the masked target, the same
distribution (and under greedy the same tokens) as constrained decoding without speculation. A draft token the
grammar forbids has p = 0 and is always rejected, so positions after it are never emitted: they are left
unmasked (as are positions after the grammar's end), rather than advancing a matcher into its error state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from helix_serve.engine.sequence import Sequence
from helix_serve.engine.structured.grammar import Matcher

_BITS = torch.tensor([1 << i for i in range(32)], dtype=torch.int64).to(torch.int32)  # bit i of a packed word


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 packed masks (bit t%32 of word t//32) → [R, V] bool, True where allowed."""
    bits = (bitmask[:, :, None] & _BITS.to(bitmask.device)) != 0  # [R, W, 32]
    return bits.flatten(1)[:, :vocab_size]


def _allows(mask: torch.Tensor, token: int) -> bool:
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)


@dataclass(slots=True)
class _Chain:
    """One constrained sequence's draft positions in this step."""

    matcher: Matcher | None  # a fork at `tokens`; None once a forbidden token or the grammar's end was passed
    tokens: list[int] = field(default_factory=list)  # draft tokens consumed so far
    masks: list[torch.Tensor | None] = field(default_factory=list)  # masks[j]: [W] after tokens[:j]; None: free


class StepMasks:
    """Masks for one step's batch; rows are batch rows (sequences), as in `_StepInputs.probs`."""

    def __init__(self, chains: dict[int, _Chain], vocab_size: int):
        self.chains, self.vocab_size = chains, vocab_size
        self.width = (vocab_size + 31) // 32

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int) -> StepMasks | None:
        """None when no sequence of the batch is constrained (nothing to do)."""
        chains = {i: _Chain(s.grammar.fork()) for i, s in enumerate(seqs) if s.grammar is not None}
        return cls(chains, vocab_size) if chains else None

    def apply(self, logits: torch.Tensor, seq_rows: torch.Tensor, earlier_ids: torch.Tensor,
              num_earlier: torch.Tensor) -> torch.Tensor:
        """[R, V] logits with forbidden tokens at −inf (arguments as in Penalties.apply)."""
        rows, counts = seq_rows.tolist(), num_earlier.tolist()
        packed = torch.full((len(rows), self.width), -1, dtype=torch.int32)  # all allowed
        earlier = None
        for r, (row, count) in enumerate(zip(rows, counts)):
            chain = self.chains.get(row)
            if chain is None:
                continue
            if earlier is None:
                earlier = earlier_ids.cpu()
            mask = self._mask_at(chain, earlier[r, :count].tolist())
            if mask is not None:
                packed[r] = mask
        allowed = unpack(packed.to(logits.device), logits.shape[-1])
        return logits.masked_fill(~allowed, float("-inf"))

    def _mask_at(self, chain: _Chain, prefix: list[int]) -> torch.Tensor | None:
        """The mask after `prefix` (this step's draft tokens before the position), computing along the way."""
        while True:
            n = len(chain.tokens)
            if len(chain.masks) == n:
                chain.masks.append(self._fill(chain.matcher))
            if n >= len(prefix):
                return chain.masks[len(prefix)]
            token, mask = prefix[n], chain.masks[n]
            if chain.matcher is not None and (mask is None or not _allows(mask, token)):
                chain.matcher = None  # forbidden here: this token is always rejected, what follows never emitted
            if chain.matcher is not None:
                chain.matcher.advance([token])
            chain.tokens.append(token)

    def _fill(self, matcher: Matcher | None) -> torch.Tensor | None:
        if matcher is None:
            return None
        bitmask = torch.zeros(1, self.width, dtype=torch.int32)
        matcher.fill(bitmask, 0)
        return bitmask[0] if bool(bitmask.any()) else None  # an empty mask (past the end): leave it free
