"""Each step, for each sequence: which proposer drafts (none, prompt lookup, the draft model) and how many
tokens, chosen for the goodput of the whole step.

Gain. A proposer accepted at rate α that drafts K tokens makes its sequence emit E(α, K) = (1 − α^(K+1)) /
(1 − α) tokens (Leviathan et al. 2023): its j-th draft token adds α^j expected tokens, less for each j.
Cost. A step costs target(N) + P · draft(R) + overhead (step_cost.py): N batched tokens, P draft-model
passes over R rows; the curves are measured, so a verify pass that turns compute-bound under load shows up.
Choice. For each draft depth P (0 … k_max) every sequence takes the proposer that expects more tokens from
it (prompt lookup costs nothing to run but proposes only where the text repeats itself); all the possible
extra draft tokens of the batch are ranked by gain, and the prefix of that ranking with the most expected
tokens per second wins. K = 0 everywhere is a candidate like the others, so speculation switches itself off
when it does not pay, per sequence and per step.
Acceptance. α is a decayed ratio of accepted to judged draft positions, per sequence and per proposer,
pulled towards a prior while evidence is thin. Prompt lookup is scored every step for free ("shadow"): its
proposals are compared with the tokens the step emitted, which are exact samples of the target, so a match
at a position happens with the probability it would have been accepted. The draft model can only be scored
by running it: a sequence that has not used it for `probe_interval` steps gets K = 1 from it on the next step
whose index is a multiple of `probe_interval`, so that under load the probes share one draft pass.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from helix_serve.engine.sequence import Acceptance, Sequence
from helix_serve.engine.step_cost import StepCostModel


class Proposer(str, enum.Enum):
    DRAFT = "draft"  # the draft model
    NGRAM = "ngram"  # prompt lookup over the sequence's own tokens


PRIORS = {Proposer.DRAFT: (0.7, 4.0), Proposer.NGRAM: (0.3, 2.0)}  # (α, weight in judged positions)


def expected_speedup(alpha: float, k: int, cost_ratio: float, verify_ratio: float = 0.0) -> float:
    """Leviathan's speedup of K draft tokens at acceptance α with draft cost c per token and verify
    growth v per token (v = 0 is the paper's formula); one sequence, costs linear in K."""
    tokens = k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return tokens / (1.0 + k * (cost_ratio + verify_ratio))


@dataclass(slots=True)
class Options:
    """What one sequence may do this step (built by the engine from its request and state)."""

    seq: Sequence
    base_tokens: int  # tokens it puts in the target pass anyway (its uncached tokens)
    room: int  # the most draft tokens its max_tokens and the context leave
    draft: bool  # the draft model may propose
    ngram_tokens: list[int]  # prompt-lookup proposals found this step ([] when none or not allowed)
    fixed_k: int | None = None  # the request's or the engine's fixed K
    judged: bool = False  # seeded sampling: the draft model always proposes K + 1 (speculative.py)


@dataclass(slots=True)
class Choice:
    proposer: Proposer | None
    k: int


@dataclass(slots=True)
class Planner:
    k_max: int = 8
    max_num_batched_tokens: int = 2048
    decay: float = 0.9
    probe_interval: int = 16

    def alpha(self, seq: Sequence, proposer: Proposer) -> float:
        prior, weight = PRIORS[proposer]
        state = seq.acceptance[proposer.value]
        return (state.accepted + prior * weight) / (state.judged + weight)

    # ---- choosing ------------------------------------------------------------------------------

    def plan(self, options: list[Options], costs: StepCostModel, step_index: int) -> list[Choice]:
        choices: list[Choice | None] = [self._forced(o, step_index) for o in options]
        free = [i for i, c in enumerate(choices) if c is None]
        fixed = [(options[i], c) for i, c in enumerate(choices) if c is not None]
        fixed_tokens = sum(c.k for _, c in fixed)
        fixed_gain = sum(self._gains(o.seq, c.proposer, c.k).sum() for o, c in fixed if c.proposer)
        fixed_draft = [(o, c) for o, c in fixed if c.proposer is Proposer.DRAFT]
        fixed_passes = max((c.k + o.judged for o, c in fixed_draft), default=0)
        base = sum(o.base_tokens for o in options) + fixed_tokens
        budget = max(self.max_num_batched_tokens - base, 0)
        any_draft = any(options[i].draft and options[i].room > 0 for i in free)
        best: tuple[float, int, list[Choice]] | None = None
        for depth in range(self.k_max + 1) if any_draft else (0,):
            picks = [self._pick(options[i], depth) for i in free]
            gains = [self._gains(options[i].seq, p.proposer, p.k) for i, p in zip(free, picks)]
            owner = np.repeat(np.arange(len(free)), [len(g) for g in gains])
            flat = np.concatenate(gains) if gains else np.zeros(0)
            order = np.argsort(-flat, kind="stable")[:budget]
            expected = len(options) + fixed_gain + np.concatenate(([0.0], np.cumsum(flat[order])))
            rows = len(fixed_draft) + sum(p.proposer is Proposer.DRAFT for p in picks)
            judged = any(options[i].judged for i in free)
            passes = max(fixed_passes, (depth if rows else 0) + judged)  # judged rows propose K + 1
            seconds = costs.step_seconds(base + np.arange(len(expected)), passes, rows)
            rate = expected / seconds
            m = int(np.argmax(rate))
            if best is None or rate[m] > best[0] * (1 + 1e-9):
                ks = np.bincount(owner[order[:m]], minlength=len(free)) if len(free) else []
                best = (float(rate[m]), depth, [Choice(p.proposer if k or options[i].judged else None, int(k))
                                                for i, p, k in zip(free, picks, ks)])
        for i, choice in zip(free, best[2] if best else []):
            choices[i] = choice
        return choices  # type: ignore[return-value]

    def _forced(self, o: Options, step_index: int) -> Choice | None:
        """A choice that is not the planner's to make: fixed K, nothing to propose, or a probe."""
        if o.room <= 0 or not (o.draft or o.ngram_tokens):
            return Choice(Proposer.DRAFT if o.judged else None, 0)
        if o.fixed_k is not None:
            proposer = self._better(o, o.fixed_k)
            cap = o.fixed_k if proposer is Proposer.DRAFT else len(o.ngram_tokens)
            k = min(o.fixed_k, cap, o.room)
            return Choice(proposer if k or o.judged else None, k)
        stale = o.seq.acceptance[Proposer.DRAFT.value].steps_since >= self.probe_interval
        if o.draft and stale and step_index % self.probe_interval == 0:
            return Choice(Proposer.DRAFT, 1)
        return None

    def _better(self, o: Options, draft_depth: int) -> Proposer:
        """The proposer that expects more tokens from this sequence (prompt lookup on a tie: it is free)."""
        if not o.draft or o.judged:
            return Proposer.NGRAM if not o.judged and o.ngram_tokens else Proposer.DRAFT
        if not o.ngram_tokens:
            return Proposer.DRAFT
        ngram = self._gains(o.seq, Proposer.NGRAM, min(len(o.ngram_tokens), o.room)).sum()
        draft = self._gains(o.seq, Proposer.DRAFT, min(draft_depth, o.room)).sum()
        return Proposer.NGRAM if ngram >= draft else Proposer.DRAFT

    def _pick(self, o: Options, depth: int) -> Choice:
        """At draft depth `depth`: this sequence's proposer and the most tokens it may draft."""
        if depth == 0 and not o.judged:
            return Choice(Proposer.NGRAM, min(len(o.ngram_tokens), o.room, self.k_max)) if o.ngram_tokens \
                else Choice(None, 0)
        proposer = self._better(o, depth)
        cap = depth if proposer is Proposer.DRAFT else len(o.ngram_tokens)
        return Choice(proposer, min(cap, o.room, self.k_max))

    def _gains(self, seq: Sequence, proposer: Proposer | None, k: int) -> np.ndarray:
        """Expected extra tokens of draft positions 1..k: α, α², ..."""
        if proposer is None or k <= 0:
            return np.zeros(0)
        return self.alpha(seq, proposer) ** np.arange(1, k + 1)

    # ---- learning ------------------------------------------------------------------------------

    def update(self, seq: Sequence, choice: Choice, num_accepted: int, emitted: list[int],
               ngram_tokens: list[int]) -> None:
        """Fold one step in: the proposer that ran, and prompt lookup's shadow score."""
        for proposer in Proposer:
            seq.acceptance[proposer.value].steps_since += 1
        if choice.proposer is not None and choice.k > 0:
            self._fold(seq.acceptance[choice.proposer.value], choice.k, num_accepted)
        if ngram_tokens and choice.proposer is not Proposer.NGRAM:
            compared = min(len(ngram_tokens), len(emitted))
            matched = next((j for j in range(compared) if ngram_tokens[j] != emitted[j]), compared)
            self._fold(seq.acceptance[Proposer.NGRAM.value], compared, matched)

    def _fold(self, state: Acceptance, num_drafted: int, num_accepted: int) -> None:
        """Positions up to and including the first rejection were judged."""
        state.steps_since = 0
        state.accepted = self.decay * state.accepted + num_accepted
        state.judged = self.decay * state.judged + min(num_accepted + 1, num_drafted)
