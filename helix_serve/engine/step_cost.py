"""What one engine step costs on this device, as curves over how much work the step holds.

A step is: draft-model passes (one token per drafting sequence each), one target pass over every batched
token (uncached tokens plus drafts), and per-step work around them (sampling, rejection, bookkeeping).
The planner needs each as a function of load, not one batch-1 number: a verify pass is nearly free while
the target is memory-bound and costs real compute once it is not. So the engine
- calibrates at start: target forwards of 1, 2, 4, ... tokens, draft forwards of 1, 2, 4, ... rows;
- refreshes from live steps: every step's measured times are folded into its curve (an exponential moving
  average at the nearest calibration point, rescaled along the curve), so the curves follow the real batch
  shapes, context lengths and thread counts the engine meets.
"""

from __future__ import annotations

import bisect
import statistics
import time
from dataclasses import dataclass

import numpy as np

from helix_serve.engine.block_manager import BlockManager
from helix_serve.engine.model_runner import ModelRunner

LIVE_WEIGHT = 0.2  # weight of one live observation in a curve point's moving average


@dataclass(slots=True)
class StepTiming:
    """What the decoder measured in one step."""

    target_s: float
    target_tokens: int
    draft_s: float = 0.0
    draft_passes: int = 0
    draft_rows: int = 0  # the widest draft pass's rows
    total_s: float = 0.0


@dataclass(slots=True)
class CostCurve:
    """Seconds as a non-decreasing piecewise-linear function of size (tokens or rows), extrapolated
    linearly past the last point."""

    sizes: list[int]
    seconds: list[float]

    def __post_init__(self) -> None:
        self._monotone()

    def _monotone(self) -> None:  # noise must never make more work look cheaper
        self.seconds = np.maximum.accumulate(np.maximum(self.seconds, 1e-9)).tolist()

    def __call__(self, size: float | np.ndarray) -> float | np.ndarray:
        sizes, seconds = self.sizes, self.seconds
        value = np.interp(size, sizes, seconds)
        if len(sizes) > 1:
            slope = (seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2])
            value = np.where(np.asarray(size) > sizes[-1], seconds[-1] + slope * (np.asarray(size) - sizes[-1]),
                             value)
        return value if isinstance(size, np.ndarray) else float(value)

    def observe(self, size: int, seconds: float) -> None:
        """Fold in one measurement: moved to the nearest point along the curve's shape, then averaged."""
        i = min(bisect.bisect_left(self.sizes, size), len(self.sizes) - 1)
        if i > 0 and abs(self.sizes[i - 1] - size) < abs(self.sizes[i] - size):
            i -= 1
        at_point = seconds * self.seconds[i] / self(size)
        self.seconds[i] = (1 - LIVE_WEIGHT) * self.seconds[i] + LIVE_WEIGHT * at_point
        self._monotone()


@dataclass(slots=True)
class StepCostModel:
    target: CostCurve  # one target pass, by batched tokens
    draft: CostCurve | None  # one draft-model pass, by rows
    overhead_s: float = 0.0  # the rest of a step
    live: bool = True  # False for configured costs: they stay as given

    @classmethod
    def from_ratios(cls, draft_ratio: float, verify_ratio: float, max_tokens: int = 2048) -> StepCostModel:
        """Costs in units of one target forward: a verify pass grows by `verify_ratio` per extra token
        and a draft pass costs `draft_ratio` whatever its rows (the configured c and v)."""
        sizes = [1, max(2, max_tokens)]
        target = CostCurve(sizes, [1.0, 1.0 + verify_ratio * (sizes[1] - 1)])
        return cls(target, CostCurve(sizes, [draft_ratio, draft_ratio]), 0.0, live=False)

    def step_seconds(self, num_tokens: int | np.ndarray, draft_passes: int, draft_rows: int) -> float | np.ndarray:
        drafting = self.draft(draft_rows) * draft_passes if self.draft is not None and draft_passes else 0.0
        return self.target(num_tokens) + drafting + self.overhead_s

    def observe(self, timing: StepTiming) -> None:
        if not self.live:
            return
        self.target.observe(timing.target_tokens, timing.target_s)
        if self.draft is not None and timing.draft_passes:
            self.draft.observe(timing.draft_rows, timing.draft_s / timing.draft_passes)
        rest = max(timing.total_s - timing.target_s - timing.draft_s, 0.0)
        self.overhead_s = (1 - LIVE_WEIGHT) * self.overhead_s + LIVE_WEIGHT * rest

    @property
    def ratios(self) -> tuple[float, float]:
        """(c, v) at batch 1: a draft pass and each extra verified token, relative to one target forward."""
        one = self.target(1)
        c = self.draft(1) / one if self.draft is not None else 0.0
        return c, (self.target(5) - one) / 4 / one


def median_time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def calibrate(target: ModelRunner, draft: ModelRunner | None, block_manager: BlockManager, max_tokens: int = 64,
              max_rows: int = 32, context: int = 64, repeats: int = 3) -> StepCostModel:
    """Time target forwards of 1, 2, 4, ... max_tokens tokens and draft forwards of 1, 2, 4, ... max_rows
    rows on a scratch sequence with `context` cached tokens. Raises ValueError when the pool is too small."""
    table: list[int] = []
    if not block_manager.ensure_slots(table, context + max_tokens):
        raise ValueError("the KV pool is too small to calibrate")
    try:
        tokens = [t % target.vocab_size for t in range(1, context + max_tokens + 1)]
        for runner in (target, draft) if draft is not None else (target,):
            runner.logits([table], [tokens[:context]], [0], [1])  # prefill the scratch context; warms up

        def forward(runner: ModelRunner, num_tokens: int, rows: int) -> None:
            chunk = tokens[context : context + num_tokens]
            runner.logits([table] * rows, [chunk] * rows, [context] * rows, [num_tokens] * rows)

        sizes = _powers_of_two(max_tokens)
        target_curve = CostCurve(sizes, [median_time(lambda n=n: forward(target, n, 1), repeats) for n in sizes])
        draft_curve = None
        if draft is not None:
            rows = _powers_of_two(max_rows)
            draft_curve = CostCurve(rows, [median_time(lambda r=r: forward(draft, 1, r), repeats) for r in rows])
        return StepCostModel(target_curve, draft_curve)
    finally:
        block_manager.release(table)


def _powers_of_two(limit: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 <= limit:
        sizes.append(sizes[-1] * 2)
    return sizes
