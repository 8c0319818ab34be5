"""What one engine step costs on this device, as curves over how much work the step holds.

A step is: draft-model passes (one token per drafting sequence each), one target pass over every batched
token (uncached tokens plus drafts), and the work around it (sampling, rejection, bookkeeping), which grows
with the tokens too. The planner needs this as a function of load, not one batch-1 number: a verify pass is
nearly free while the target is memory-bound and costs real compute once it is not. So the engine
- calibrates at start: target forwards of 1, 2, 4, ... tokens (one sequence), draft forwards of 1, 2, 4, ...
  rows;
- refreshes from live steps, per batch width (a power of two of the step's sequences, since 16 tokens over
  16 sequences cost more than 16 tokens of one): every step's time outside the draft passes corrects the
  target curve of its width at the nearest point, and points not measured yet take the correction of the
  nearest one that was (the calibrated shape, scaled). A moving average of absolute times at one point, with
  the points above it left at their calibrated values, would make wider steps look nearly free (measured:
  the planner then speculated at 16 sequences where a verify step cost 2.4x a plain one).
"""

from __future__ import annotations

import bisect
import statistics
import time
from dataclasses import dataclass, field

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
    num_seqs: int = 1


@dataclass(slots=True)
class CostCurve:
    """Seconds as a non-decreasing piecewise-linear function of size (tokens or rows), extrapolated
    linearly past the last point: a calibrated shape times a live correction per point."""

    sizes: list[int]
    calibrated: list[float]
    scale: list[float | None] = field(default_factory=list)  # per point; None until a step measured it
    seconds: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.scale = self.scale or [None] * len(self.sizes)
        self._refresh()

    def _refresh(self) -> None:
        measured = [i for i, f in enumerate(self.scale) if f is not None]
        factors = [self.scale[min(measured, key=lambda j: abs(j - i))] if measured else 1.0
                   for i in range(len(self.sizes))]
        # noise must never make more work look cheaper
        self.seconds = np.maximum.accumulate(np.maximum(np.multiply(self.calibrated, factors), 1e-9))

    def __call__(self, size: float | np.ndarray) -> float | np.ndarray:
        sizes, seconds = self.sizes, self.seconds
        value = np.interp(size, sizes, seconds)
        if len(sizes) > 1:
            slope = (seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2])
            value = np.where(np.asarray(size) > sizes[-1], seconds[-1] + slope * (np.asarray(size) - sizes[-1]),
                             value)
        return value if isinstance(size, np.ndarray) else float(value)

    def observe(self, size: int, seconds: float) -> None:
        """Fold in one measurement: the correction at the nearest point moves towards measured / predicted."""
        i = min(bisect.bisect_left(self.sizes, size), len(self.sizes) - 1)
        if i > 0 and abs(self.sizes[i - 1] - size) < abs(self.sizes[i] - size):
            i -= 1
        current = self.seconds[i] / self.calibrated[i]
        self.scale[i] = current * (1 + LIVE_WEIGHT * (seconds / self(size) - 1))
        self._refresh()

    def copy(self) -> CostCurve:
        return CostCurve(list(self.sizes), list(self.calibrated), list(self.scale))


@dataclass(slots=True)
class StepCostModel:
    target: CostCurve  # one target pass by batched tokens (calibrated on one sequence)
    draft: CostCurve | None  # one draft-model pass, by rows
    live: bool = True  # False for configured costs: they stay as given
    by_width: dict[int, CostCurve] = field(default_factory=dict)  # live target curves, by batch width

    @classmethod
    def from_ratios(cls, draft_ratio: float, verify_ratio: float, max_tokens: int = 2048) -> StepCostModel:
        """Costs in units of one target forward: a verify pass grows by `verify_ratio` per extra token
        and a draft pass costs `draft_ratio` whatever its rows (the configured c and v)."""
        sizes = [1, max(2, max_tokens)]
        target = CostCurve(sizes, [1.0, 1.0 + verify_ratio * (sizes[1] - 1)])
        return cls(target, CostCurve(sizes, [draft_ratio, draft_ratio]), live=False)

    def target_curve(self, num_seqs: int) -> CostCurve:
        """The target curve for steps of this many sequences (a new width starts from the nearest one known)."""
        if not self.live:
            return self.target
        width = 1 << (max(num_seqs, 1).bit_length() - 1)
        if width not in self.by_width:
            nearest = min(self.by_width, key=lambda w: abs(w.bit_length() - width.bit_length()), default=None)
            self.by_width[width] = (self.target if nearest is None else self.by_width[nearest]).copy()
        return self.by_width[width]

    def step_seconds(self, num_tokens: int | np.ndarray, draft_passes: int, draft_rows: int,
                     num_seqs: int = 1) -> float | np.ndarray:
        drafting = self.draft(draft_rows) * draft_passes if self.draft is not None and draft_passes else 0.0
        return self.target_curve(num_seqs)(num_tokens) + drafting

    def observe(self, timing: StepTiming) -> None:
        if not self.live:
            return
        rest = max(timing.total_s - timing.draft_s, timing.target_s)  # everything but the draft passes
        self.target_curve(timing.num_seqs).observe(timing.target_tokens, rest)
        if self.draft is not None and timing.draft_passes:
            self.draft.observe(timing.draft_rows, timing.draft_s / timing.draft_passes)

    @property
    def ratios(self) -> tuple[float, float]:
        """(c, v) at batch 1: a draft pass and each extra verified token, relative to one target forward."""
        target = self.by_width.get(1, self.target)
        one = target(1)
        c = self.draft(1) / one if self.draft is not None else 0.0
        return c, (target(5) - one) / 4 / one


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
