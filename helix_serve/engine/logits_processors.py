"""Penalties and logit bias: the logit adjustments that depend on the tokens a sequence has so far.

They are applied to draft and target logits identically, before `logits_to_probs`, each position with its
own history: at position j of a speculative step the output includes the j earlier draft tokens of that
step. The draft's q and the target's p at a position are then the distributions a target-only sampler
with these settings would use after the same tokens, so rejection sampling stays exact whatever K is.

Only the tokens a sequence has seen (its prompt for the repetition penalty, its output, this step's earlier
drafts) and its biased tokens change, so each position gathers those logits, adjusts them and scatters them
back: O(tokens seen) per position, not O(V). Every other logit is left as it is, as the formulas would leave it.

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
class TokenCounts:
    """One sequence's token history as the penalties read it, kept on the device and grown by the new
    tokens only (token ids are only ever appended, so counts only grow and stay valid across preemption)."""

    prompt_seen: torch.Tensor  # [V] bool: in the prompt (all False unless the repetition penalty reads it)
    output_counts: torch.Tensor  # [V] float32: occurrences in the output
    num_counted: int  # leading token ids counted (the prompt's included)
    seen: torch.Tensor  # [S] the distinct token ids counted or in prompt_seen: where penalties may apply

    @classmethod
    def of_prompt(cls, seq: Sequence, vocab_size: int, device: torch.device) -> TokenCounts:
        prompt_seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        seen = torch.zeros(0, dtype=torch.long, device=device)
        if seq.params.repetition_penalty != 1.0:  # only the repetition penalty reads the prompt
            seen = torch.tensor(sorted(set(seq.prompt_token_ids)), device=device)
            prompt_seen[seen] = True
        return cls(prompt_seen, torch.zeros(vocab_size, device=device), seq.num_prompt_tokens, seen)

    def update(self, token_ids: list[int]) -> None:
        """Count the tokens appended since the last update."""
        new = token_ids[self.num_counted :]
        if new:
            ids = torch.tensor(new, device=self.output_counts.device)
            unseen = ids[(self.output_counts[ids] == 0) & ~self.prompt_seen[ids]].unique()
            self.seen = torch.cat((self.seen, unseen))
            self.output_counts.index_put_((ids,), torch.ones(len(new), device=ids.device), accumulate=True)
            self.num_counted = len(token_ids)


@dataclass(slots=True)
class PenaltyRow:
    """One sequence's settings and token history for one step."""

    repetition: float
    frequency: float
    presence: float
    bias: dict[int, float]
    seq: Sequence | None  # whose tokens the penalties read (None: a neutral row)

    @classmethod
    def of(cls, seq: Sequence) -> PenaltyRow | None:
        """None when the sequence uses none of them (its logits are left as they are)."""
        params = seq.params
        if not params.penalized:
            return None
        return cls(params.repetition_penalty, params.frequency_penalty, params.presence_penalty,
                   params.logit_bias, seq)

    def counts(self, vocab_size: int, device: torch.device) -> TokenCounts:
        """The sequence's counts, brought up to its tokens now (made from its prompt the first time)."""
        seq = self.seq
        if seq.penalty_counts is None:
            seq.penalty_counts = TokenCounts.of_prompt(seq, vocab_size, device)
        seq.penalty_counts.update(seq.token_ids)
        return seq.penalty_counts


@dataclass(slots=True)
class Penalties:
    """A step's penalty settings and state, one row per sequence of the batch (neutral rows for the
    sequences that use none: dividing by 1, subtracting 0 and adding 0 leave their logits exactly)."""

    repetition: torch.Tensor  # [N]
    frequency: torch.Tensor  # [N]
    presence: torch.Tensor  # [N]
    bias: torch.Tensor | None  # [N, V]; None when no row has a logit_bias
    prompt_seen: torch.Tensor  # [N, V] bool
    output_counts: torch.Tensor  # [N, V] tokens emitted before this step
    touched: torch.Tensor  # [N, S] each row's seen and biased token ids (padded by repeating one of them)

    @classmethod
    def build(cls, rows: list[PenaltyRow | None], vocab_size: int, device: torch.device) -> Penalties | None:
        """None when no sequence of the batch uses any (the common case costs nothing). Each sequence's
        counts are its own, grown by its new tokens only: building costs O(N·V), not O(history)."""
        if all(r is None for r in rows):
            return None
        neutral = PenaltyRow(1.0, 0.0, 0.0, {}, None)
        rows = [r or neutral for r in rows]

        def settings(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        bias = torch.zeros(len(rows), vocab_size, device=device) if any(r.bias for r in rows) else None
        for i, row in enumerate(rows):
            if row.bias:
                bias[i, torch.tensor(list(row.bias), device=device)] = settings(list(row.bias.values()))
        counts = [None if r.seq is None else r.counts(vocab_size, device) for r in rows]
        never = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        zeros = torch.zeros(vocab_size, device=device)
        touched = [torch.cat((torch.zeros(0, dtype=torch.long, device=device) if c is None else c.seen,
                              torch.tensor(list(r.bias), dtype=torch.long, device=device))) for r, c in zip(rows, counts)]
        return cls(settings([r.repetition for r in rows]), settings([r.frequency for r in rows]),
                   settings([r.presence for r in rows]), bias,
                   torch.stack([never if c is None else c.prompt_seen for c in counts]),
                   torch.stack([zeros if c is None else c.output_counts for c in counts]), _pad_rows(touched))

    def apply(self, logits: torch.Tensor, seq_rows: torch.Tensor, earlier_ids: torch.Tensor,
              num_earlier: torch.Tensor) -> torch.Tensor:
        """The logits at R positions of this step, adjusted in place.

        Args:
            logits: [R, V] raw logits (fp32).
            seq_rows: [R] the batch row (sequence) of each position.
            earlier_ids: [R, W] token ids drafted earlier in this step for that sequence (padding past
                num_earlier is ignored).
            num_earlier: [R] how many of them precede the position (its index in the step).
        """
        seq_rows = seq_rows.to(logits.device)
        earlier_ids = earlier_ids.to(logits.device)
        earlier = (torch.arange(earlier_ids.shape[1], device=logits.device)[None, :]
                   < num_earlier.to(logits.device)[:, None])  # [R, W]
        # Every token whose logit may change, [R, S + W]; one listed twice gets the same value both times.
        ids = torch.cat((self.touched[seq_rows], earlier_ids), dim=1)
        rows = seq_rows[:, None]
        drafted = ((ids[:, :, None] == earlier_ids[:, None, :]) & earlier[:, None, :]).sum(-1)
        counts = self.output_counts[rows, ids] + drafted  # [R, S + W]
        present = counts > 0
        values = logits.gather(1, ids)
        repetition = self.repetition[seq_rows][:, None]
        penalized = torch.where(values > 0, values / repetition, values * repetition)
        values = torch.where(present | self.prompt_seen[rows, ids], penalized, values)
        values = values - self.frequency[seq_rows][:, None] * counts - self.presence[seq_rows][:, None] * present
        if self.bias is not None:
            values = values + self.bias[rows, ids]
        return logits.scatter_(1, ids, values)


def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """1-D long tensors → [N, longest], each padded by repeating its first entry (token 0 for an empty one)."""
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat((r, (r[:1] if len(r) else r.new_zeros(1)).expand(width - len(r)))) for r in rows])
