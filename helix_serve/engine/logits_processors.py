"""Penalties and logit bias: the logit adjustments that depend on the tokens a sequence has so far.

They are applied to draft and target logits identically, before `logits_to_probs`, each position with its
own history: at position j of a speculative step the output includes the j earlier draft tokens of that
step. The draft's q and the target's p at a position are then the distributions a target-only sampler
with these settings would use after the same tokens, so rejection sampling stays exact whatever K is.

Order, as in HF transformers and vLLM: the repetition penalty (tokens of the prompt and the output: a
positive logit is divided by it, a negative one multiplied), then the frequency and presence penalties
(output tokens only: minus frequency·count, minus presence once), then logit_bias is added. Temperature,
min-p, top-k and top-p follow in `sampler.logits_to_probs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_serve.engine.sequence import Sequence


@dataclass(slots=True)
class PenaltyRow:
    """One sequence's settings and token history for one step."""

    repetition: float
    frequency: float
    presence: float
    bias: dict[int, float]
    prompt_ids: list[int]
    output_ids: list[int]

    @classmethod
    def of(cls, seq: Sequence) -> PenaltyRow | None:
        """None when the sequence uses none of them (its logits are left as they are)."""
        params = seq.params
        if not params.penalized:
            return None
        return cls(params.repetition_penalty, params.frequency_penalty, params.presence_penalty,
                   params.logit_bias, seq.prompt_token_ids, seq.output_token_ids)


def _counts(token_ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[N, V] how often each token occurs in each row's list."""
    counts = torch.zeros(len(token_ids), vocab_size, device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), torch.tensor([len(t) for t in token_ids]))
    ids = torch.tensor([i for t in token_ids for i in t], dtype=torch.long)
    counts.index_put_((rows.to(device), ids.to(device)), torch.ones(len(ids), device=device), accumulate=True)
    return counts


@dataclass(slots=True)
class Penalties:
    """A step's penalty settings and state, one row per sequence of the batch (neutral rows for the
    sequences that use none: dividing by 1, subtracting 0 and adding 0 leave their logits exactly)."""

    repetition: torch.Tensor  # [N]
    frequency: torch.Tensor  # [N]
    presence: torch.Tensor  # [N]
    bias: torch.Tensor  # [N, V]
    prompt_seen: torch.Tensor  # [N, V] bool
    output_counts: torch.Tensor  # [N, V] tokens emitted before this step

    @classmethod
    def build(cls, rows: list[PenaltyRow | None], vocab_size: int, device: torch.device) -> Penalties | None:
        """None when no sequence of the batch uses any (the common case costs nothing)."""
        if all(r is None for r in rows):
            return None
        neutral = PenaltyRow(1.0, 0.0, 0.0, {}, [], [])
        rows = [r or neutral for r in rows]

        def settings(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        bias = torch.zeros(len(rows), vocab_size, device=device)
        for i, row in enumerate(rows):
            if row.bias:
                bias[i, torch.tensor(list(row.bias), device=device)] = settings(list(row.bias.values()))
        prompts = [r.prompt_ids if r.repetition != 1.0 else [] for r in rows]  # only the repetition penalty reads them
        return cls(settings([r.repetition for r in rows]), settings([r.frequency for r in rows]),
                   settings([r.presence for r in rows]), bias, _counts(prompts, vocab_size, device) > 0,
                   _counts([r.output_ids for r in rows], vocab_size, device))

    def apply(self, logits: torch.Tensor, seq_rows: torch.Tensor, earlier_ids: torch.Tensor,
              num_earlier: torch.Tensor) -> torch.Tensor:
        """Adjusted logits at R positions of this step.

        Args:
            logits: [R, V] raw logits (fp32).
            seq_rows: [R] the batch row (sequence) of each position.
            earlier_ids: [R, W] token ids drafted earlier in this step for that sequence (padding past
                num_earlier is ignored).
            num_earlier: [R] how many of them precede the position (its index in the step).
        """
        seq_rows = seq_rows.to(logits.device)
        earlier = (torch.arange(earlier_ids.shape[1], device=logits.device)[None, :]
                   < num_earlier.to(logits.device)[:, None]).float()  # [R, W]
        counts = self.output_counts[seq_rows].scatter_add(1, earlier_ids.to(logits.device), earlier)  # [R, V]
        present = counts > 0
        repetition = self.repetition[seq_rows][:, None]
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(present | self.prompt_seen[seq_rows], penalized, logits)
        logits = logits - self.frequency[seq_rows][:, None] * counts - self.presence[seq_rows][:, None] * present
        return logits + self.bias[seq_rows]
