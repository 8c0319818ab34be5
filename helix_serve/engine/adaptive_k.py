"""Choose each sequence's number of draft tokens K from its observed acceptance and from load.

Rule: with acceptance rate α, one speculative step emits (1 − α^(K+1)) / (1 − α) tokens (Leviathan et
al. 2023, thm 3.8). Its cost, in units of one plain target forward, is 1 + K·c + K·v: K draft forwards
of relative cost c, and a verify pass whose cost grows by v per extra token (Leviathan's model takes
v = 0; on CPUs and small models v is not negligible, so both are measured at start, see
calibration.py). K is the value in [k_min, k_max] that maximises tokens / cost, K = 0 (plain decoding,
speedup 1) included, so speculation switches itself off when it does not pay.
α is a decayed ratio of accepted to judged draft positions, so it follows drift within a request;
a sequence parked at K = 0 probes K = 1 every `probe_interval` steps so that α can recover.
Load: the verify pass of a batch holds Σ(K+1) tokens; K is capped so that the batch stays within
`max_num_batched_tokens`, because past that point extra draft tokens cost real target compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from helix_serve.engine.sequence import Sequence


def expected_speedup(alpha: float, k: int, cost_ratio: float, verify_ratio: float = 0.0) -> float:
    """Expected speedup of K draft tokens at acceptance α, draft cost ratio c and verify cost ratio v
    (v = 0 is Leviathan's formula)."""
    tokens = k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return tokens / (1.0 + k * (cost_ratio + verify_ratio))


@dataclass(slots=True)
class AdaptiveK:
    k_min: int = 0
    k_max: int = 8
    decay: float = 0.9
    prior_alpha: float = 0.7
    prior_weight: float = 4.0
    probe_interval: int = 16
    max_num_batched_tokens: int = 2048

    def alpha(self, seq: Sequence) -> float:
        """Decayed acceptance estimate, pulled towards the prior while there is little evidence."""
        return (seq.accept_weight + self.prior_alpha * self.prior_weight) / (seq.judged_weight + self.prior_weight)

    def choose(self, seq: Sequence, cost_ratio: float, num_running: int, verify_ratio: float = 0.0) -> int:
        load_cap = max(self.max_num_batched_tokens // max(num_running, 1) - 1, 0)
        hi = min(self.k_max, load_cap)
        lo = min(self.k_min, hi)
        alpha = self.alpha(seq)
        best = max(range(lo, hi + 1), key=lambda k: expected_speedup(alpha, k, cost_ratio, verify_ratio))
        if best == 0 and hi >= 1 and seq.steps_since_speculation >= self.probe_interval:
            return 1
        return best

    def update(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        """Fold one verify step in: positions up to and including the first rejection were judged."""
        if num_drafted == 0:
            seq.steps_since_speculation += 1
            return
        seq.steps_since_speculation = 0
        judged = min(num_accepted + 1, num_drafted)
        seq.accept_weight = self.decay * seq.accept_weight + num_accepted
        seq.judged_weight = self.decay * seq.judged_weight + judged
