"""Measure what a speculative step costs on this device, once, at engine start.

Leviathan's speedup model counts a verify pass of K+1 tokens as one target forward. On small models
and CPUs it is not: each extra token costs a little more. The calibration times, on a scratch
sequence with `context` cached tokens, a 1-token target forward, a (1+K)-token target forward and a
1-token draft forward, and expresses them relative to the first (c and v below).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from helix_serve.engine.block_manager import BlockManager
from helix_serve.engine.model_runner import ModelRunner


@dataclass(frozen=True, slots=True)
class StepCosts:
    target_decode_s: float  # one-token target forward
    target_verify_s: float  # (1 + verify_k)-token target forward
    draft_decode_s: float  # one-token draft forward
    verify_k: int

    @property
    def draft_ratio(self) -> float:
        """c: one draft forward / one target forward."""
        return self.draft_decode_s / self.target_decode_s

    @property
    def verify_ratio(self) -> float:
        """v: extra target cost per verified draft token / one target forward."""
        extra = (self.target_verify_s - self.target_decode_s) / self.verify_k
        return max(extra, 0.0) / self.target_decode_s


def median_time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure_step_costs(
    target: ModelRunner, draft: ModelRunner, block_manager: BlockManager, context: int = 64, verify_k: int = 4,
    repeats: int = 5,
) -> StepCosts:
    """Time the forwards a speculative step is made of (needs context + verify_k free slots)."""
    table: list[int] = []
    if not block_manager.ensure_slots(table, context + verify_k):
        raise ValueError("the KV pool is too small to calibrate")
    try:
        tokens = [t % target.vocab_size for t in range(1, context + verify_k + 1)]
        for runner in (target, draft):
            runner.logits([table], [tokens[:context]], [0], [1])  # prefill the scratch context
        decode = lambda runner: runner.logits([table], [tokens[context - 1 : context]], [context - 1], [1])  # noqa: E731
        verify = lambda: target.logits([table], [tokens[context - 1 :]], [context - 1], [verify_k + 1])  # noqa: E731
        decode(target)  # warm-up
        return StepCosts(
            target_decode_s=median_time(lambda: decode(target), repeats),
            target_verify_s=median_time(verify, repeats),
            draft_decode_s=median_time(lambda: decode(draft), repeats),
            verify_k=verify_k,
        )
    finally:
        block_manager.release(table)
