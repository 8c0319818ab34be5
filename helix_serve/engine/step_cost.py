"""What one engine step costs on this device, predicted from the step's shape.

A step is: draft-model passes, one target pass, turning logits into distributions (penalties, temperature,
top-k/top-p; per row of logits), and the rest (rejection, bookkeeping). The planner needs each as a function of
the step's shape, not one batch-1 number: a verify pass is nearly free while the target is memory-bound and
costs real compute once it is not. A forward pass of either model costs, to a good approximation,

    forward(T, R, C) = tokens(T) + rows(R) + per_context · (C − R · C₀)

- tokens(T): T batched tokens of one sequence (projections and LM head). Sampled at every T up to 6 and more
  sparsely after, on both sides of every multiple of 16: CPU GEMM kernels change at small widths (on the 2-core
  EPYC, 5 rows cost ~1.4× 4 rows) and tile the tokens by 16 (on the 2-core Xeon, one sequence: 32 → 33 tokens
  78 → 92 ms in int4, 79 → 96 ms in fp32; 33 → 48 tokens +20 ms and +1 ms). A curve through 32 and 48 alone
  put the 33rd token at 2 ms: under load, where K = 0 is one token per row, each one-token probe or draft beside
  16 or 32 rows cost several times its prediction (int4 Xeon, EAGLE, 32 streams: 0.93× K=0).
  Up to 256 tokens for both models: verify passes under load reach rows × (K + 1) (32 × 9), and a curve extended
  past its last point misses how kernels steepen (int4 on a 2-core Xeon: 1.6–1.7 ms per token from 48 to 64,
  2.2–2.8 from 192 to 256; calibrated to 64 only, a 16-row pass of 112 tokens was under-predicted by 15 %).
- rows(R): what R sequences of one token each cost over R tokens of one sequence (per-sequence attention work).
- per_context: each token of K/V the paged attention gathers (rows × the longest context of their class,
  attention.py) beyond the C₀ per row that calibration used.

The engine calibrates these at start, for the target and its model-based proposer: the draft model or an EAGLE
head (one decoder layer over the target's features, engine/eagle_runner.py; at most one of the two per engine).
Live steps then refresh one scale per model (an exponential moving average of measured ÷ predicted), so the
curves keep their measured shape while following threads, contention and clock speed; a per-point refresh would
let one noisy step reshape a curve for good. Shape errors are learnt apart for three kinds of pass: decode (one
token per row), verify (rows of up to VERIFY_QUERY tokens, attention.py) and prefill (a longer row among them). The
planner's choice under load is exactly decode against verify, and the additive curves get it wrong by several
percent — measured on a 2-core Xeon, int4, 32 rows: the scale fitted to the verify steps that ran predicted the
plain step 10 % too slow, so drafting looked 10 % better than it was (the context term, timed on one row at a long
context, is too steep for many one-token rows). So decode and prefill passes keep a bias relative to verify passes
and the scale learns from every pass net of its kind's bias. A bias is learnt from contrasts only: where the kind
of pass switches, the new pass against the other kind's recent passes just before it (each kind's measured ÷
unscaled, a fast moving average); decode against verify teaches the decode bias, prefill against either teaches
the prefill bias. Contention moves every kind alike, so a stretch of decode passes alone (K = 0 chosen for a
while) moves the scale and leaves the biases; the old rule (the bias learnt 5× slower than the scale from every
decode pass) let such a stretch shift both, and learnt a bias so slowly that at 16 streams drafting steps were
still predicted 5 % too cheap and decode steps 3 % too dear after a hundred steps of each. Prefill is a kind of
its own because its error can have the other sign: with verify and prefill passes in one kind (until the eleventh
session), at 16 streams (int4 head, Zen 5) prefill-bearing steps ran 10 % under their prediction and drafting
steps 5.5 % over it, and decode steps, contrasted mostly with prefill steps, learnt a bias of 1.00–1.07 where
they ran 2 % under theirs: drafting looked ~8 % cheaper against K = 0 than it was.
The draft's first pass in a step catches it up on every token it has not seen yet (after the target's prefill,
after steps where prompt lookup or nothing drafted, after preemption): a pass of that many tokens, not a one-row
pass. The head's catch-up pass is shaped the same way but one token shorter: its entry t pairs the target's
feature at t with token t + 1, so it trails the sequence by one. Processing and the rest are moving averages: per row
of logits (learnt from steps without drafts), and per step plus per drafted token (what a drafting step adds
beyond its rows: measured at 16 streams, int4, a verified row's logits cost 0.19 ms against a decode row's 0.13).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from helix_serve.device import synchronize
from helix_serve.engine.block_manager import BlockManager
from helix_serve.engine.eagle_runner import EagleRunner, HeadPasses
from helix_serve.engine.model_runner import ModelRunner
from helix_serve.model.attention import VERIFY_QUERY

LIVE_WEIGHT = 0.1  # weight of one live step in the moving averages
SCALE_RANGE = (0.25, 4.0)  # one step moves a scale at most this far (a stall or a paused process is not a trend)
BIAS_WEIGHT = 0.1  # of one contrast in a kind's bias (module docstring)
KIND_WEIGHT = 0.3  # of one pass in its kind's recent measured ÷ unscaled


DECODE, VERIFY, PREFILL = range(3)  # kinds of pass, each with its own shape bias (module docstring)


def pass_kind(tokens: int | np.ndarray, rows: int | np.ndarray, prefill: bool | np.ndarray) -> np.ndarray:
    """A pass with a row longer than a verify row is a prefill; else one token per row is a decode."""
    return np.where(prefill, PREFILL, np.where(np.asarray(tokens) <= rows, DECODE, VERIFY))


def _clamp(ratio: float, current: float) -> float:
    return min(max(ratio, current * SCALE_RANGE[0]), current * SCALE_RANGE[1])


@dataclass(frozen=True, slots=True)
class PassShape:
    """What one forward pass holds."""

    tokens: int  # batched tokens
    rows: int  # sequences
    context: int  # K/V tokens the attention gathers: each class of rows × its longest context
    longest_query: int = 0  # the longest row's tokens (0: unknown; a decode or verify pass by tokens and rows)

    @property
    def kind(self) -> int:
        return int(pass_kind(self.tokens, self.rows, self.longest_query > VERIFY_QUERY))


@dataclass(slots=True)
class PassTiming:
    shape: PassShape
    seconds: float


@dataclass(slots=True)
class StepTiming:
    """What the decoder measured in one step."""

    target: PassTiming | None = None
    drafts: list[PassTiming] = field(default_factory=list)  # the draft model's passes, catch-up pass first
    heads: list[PassTiming] = field(default_factory=list)  # the EAGLE head's passes, catch-up pass first
    processing_s: float = 0.0  # logits → distributions (and sampling the drafts), both models
    processed_rows: int = 0
    drafted_tokens: int = 0  # draft tokens proposed (by any proposer)
    total_s: float = 0.0

    @property
    def rest_s(self) -> float:
        passes = (self.target.seconds if self.target else 0.0) + sum(d.seconds for d in self.drafts + self.heads)
        return max(self.total_s - passes - self.processing_s, 0.0)


def _interp(size: float | np.ndarray, sizes: list[int], seconds: list[float]) -> float | np.ndarray:
    """Piecewise linear through the points, extended linearly past the last one."""
    value = np.interp(size, sizes, seconds)
    if len(sizes) > 1:
        slope = (seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2])
        past = np.asarray(size) > sizes[-1]
        value = np.where(past, seconds[-1] + slope * (np.asarray(size) - sizes[-1]), value)
    return value if isinstance(size, np.ndarray) else float(value)


DENSE_SIZES = 4096  # curve values at every integer size below this are tabulated


def _lookup(table: np.ndarray, size: float | np.ndarray, sizes: list[int], seconds: list[float]) -> float | np.ndarray:
    """`_interp` from a dense table for integer sizes inside it."""
    index = np.asarray(size)
    if index.dtype.kind in "iu" and (index.size == 0 or (index.min() >= 0 and index.max() < len(table))):
        return table[index]
    return _interp(size, sizes, seconds)


@dataclass(slots=True)
class ForwardCost:
    """One model's forward-pass cost (module docstring), in seconds."""

    token_sizes: list[int]
    token_seconds: list[float]  # one sequence of T tokens at context C₀
    row_sizes: list[int] = field(default_factory=lambda: [1])
    row_seconds: list[float] = field(default_factory=lambda: [0.0])  # R one-token rows over one R-token row
    per_context_s: float = 0.0
    base_context: int = 0  # C₀
    scale: float = 1.0  # live: measured ÷ predicted, averaged over every pass
    # live, per kind of pass: measured ÷ predicted by `scale` (docstring); verify passes are the reference
    kind_bias: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    recent: dict[int, float] = field(default_factory=dict)  # kind → recent measured ÷ unscaled
    last_kind: int | None = None  # the kind of the last pass observed

    _by_tokens: np.ndarray | None = field(default=None, init=False, repr=False)  # dense tables, built once:
    _by_rows: np.ndarray | None = field(default=None, init=False, repr=False)  # the planner asks every step

    def unscaled(self, tokens: float | np.ndarray, rows: int | np.ndarray = 1,
                 context: int | np.ndarray | None = None) -> float | np.ndarray:
        if self._by_tokens is None:
            self._by_tokens = np.asarray(_interp(np.arange(DENSE_SIZES), self.token_sizes, self.token_seconds))
            self._by_rows = np.asarray(_interp(np.arange(DENSE_SIZES), self.row_sizes, self.row_seconds))
        by_tokens = _lookup(self._by_tokens, tokens, self.token_sizes, self.token_seconds)
        context = np.multiply(rows, self.base_context) if context is None else context
        by_rows = _lookup(self._by_rows, rows, self.row_sizes, self.row_seconds)
        extra = by_rows + self.per_context_s * (np.asarray(context) - np.multiply(rows, self.base_context))
        return np.maximum(by_tokens + extra, 0.5 * by_tokens)  # noisy corrections never make a pass nearly free

    def __call__(self, tokens: float | np.ndarray, rows: int = 1, context: int | None = None,
                 prefill: bool = False) -> float | np.ndarray:
        """`prefill`: the pass has a row longer than a verify row (`pass_kind`)."""
        bias = np.asarray(self.kind_bias)[pass_kind(tokens, rows, prefill)]
        value = self.scale * bias * self.unscaled(tokens, rows, context)
        return value if np.ndim(value) else float(value)

    def of(self, shape: PassShape) -> float:
        return float(self(shape.tokens, shape.rows, shape.context, shape.longest_query > VERIFY_QUERY))

    def observe(self, timing: PassTiming) -> None:
        shape = timing.shape
        ratio = timing.seconds / float(self.unscaled(shape.tokens, shape.rows, shape.context))
        kind, before = shape.kind, self.last_kind
        last = self.recent.get(kind, ratio)
        self.recent[kind] = (1 - KIND_WEIGHT) * last + KIND_WEIGHT * _clamp(ratio, last)
        if before is not None and before != kind:  # the kind switched: this pass against the other kind's just before
            ratios = {kind: _clamp(ratio, last), before: self.recent[before]}
            learner = PREFILL if PREFILL in ratios else DECODE  # decode against verify, prefill against either
            other = before if learner == kind else kind
            bias = self.kind_bias[learner]
            contrast = _clamp(self.kind_bias[other] * ratios[learner] / ratios[other], bias)
            self.kind_bias[learner] = (1 - BIAS_WEIGHT) * bias + BIAS_WEIGHT * contrast
        self.last_kind = kind
        ratio /= self.kind_bias[kind]
        self.scale = (1 - LIVE_WEIGHT) * self.scale + LIVE_WEIGHT * _clamp(ratio, self.scale)


@dataclass(frozen=True, slots=True)
class DraftWork:
    """The model proposer's part of a step: `passes` passes over `rows` sequences, the first also catching up."""

    passes: int | np.ndarray
    rows: int | np.ndarray
    catch_up_tokens: int | np.ndarray  # tokens of the first pass (each row's unseen tokens, its newest included)
    context: int | np.ndarray
    head: bool = False  # the EAGLE head's passes, not the draft model's


def _ema(average: float, value: float) -> float:
    return (1 - LIVE_WEIGHT) * average + LIVE_WEIGHT * value


@dataclass(slots=True)
class StepCostModel:
    target: ForwardCost
    draft: ForwardCost | None  # the draft model's passes
    per_row_processing_s: float = 0.0  # one row of logits to its distribution
    per_step_s: float = 0.0  # the rest of a step without drafts...
    per_draft_token_s: float = 0.0  # ...and what each drafted token adds to it and to the processing
    live: bool = True  # False for configured costs: they stay as given
    eagle: ForwardCost | None = None  # the EAGLE head's passes (an engine loads it or a draft model, not both)

    @classmethod
    def from_ratios(cls, draft_ratio: float, verify_ratio: float, max_tokens: int = 2048,
                    head: bool = False) -> StepCostModel:
        """Costs in units of one target forward: a verify pass grows by `verify_ratio` per extra token and a
        proposer pass (the draft model's, or the EAGLE head's with `head`) costs `draft_ratio` whatever its shape
        (the configured c and v)."""
        sizes = [1, max(2, max_tokens)]
        target = ForwardCost(sizes, [1.0, 1.0 + verify_ratio * (sizes[1] - 1)])
        proposer = ForwardCost(sizes, [draft_ratio, draft_ratio])
        return cls(target, None, live=False, eagle=proposer) if head else cls(target, proposer, live=False)

    def draft_seconds(self, work: DraftWork | None) -> float | np.ndarray:
        """The model proposer's passes (the fields of `work` may be arrays over candidate plans)."""
        cost = None if work is None else self.eagle if work.head else self.draft
        if cost is None:
            return 0.0
        passes, rows = np.asarray(work.passes), np.maximum(np.asarray(work.rows), 1)
        first = cost(np.maximum(work.catch_up_tokens, rows), rows, work.context)
        later = cost(rows, rows, work.context)
        return np.where(passes > 0, first + np.maximum(passes - 1, 0) * later, 0.0)

    def step_seconds(self, num_tokens: int | np.ndarray, rows: int = 1, context: int | None = None,
                     draft: DraftWork | None = None, num_drafted: int | np.ndarray = 0,
                     prefill: bool = False) -> float | np.ndarray:
        """A whole step: target pass over `num_tokens` tokens of `rows` sequences (`prefill`: one of them longer
        than a verify row), the draft's work, the processing of every row of logits, and the rest."""
        logit_rows = rows + np.asarray(num_drafted) + (np.asarray(draft.passes) * draft.rows if draft else 0)
        return (self.target(num_tokens, rows, context, prefill) + self.draft_seconds(draft)
                + self.per_row_processing_s * logit_rows + self.per_step_s
                + self.per_draft_token_s * np.asarray(num_drafted))

    def predict(self, timing: StepTiming) -> float:
        """What the model expects a step of this measured shape to cost (before it observes the step)."""
        target = self.target.of(timing.target.shape) if timing.target else 0.0
        drafts = sum(self.draft.of(d.shape) for d in timing.drafts) if self.draft else 0.0
        drafts += sum(self.eagle.of(h.shape) for h in timing.heads) if self.eagle else 0.0
        return (target + drafts + self.per_row_processing_s * timing.processed_rows + self.per_step_s
                + self.per_draft_token_s * timing.drafted_tokens)

    def observe(self, timing: StepTiming) -> None:
        if not self.live:
            return
        if timing.target is not None:
            self.target.observe(timing.target)
        for pass_timing in timing.drafts:
            self.draft.observe(pass_timing)
        for pass_timing in timing.heads:
            self.eagle.observe(pass_timing)
        if timing.drafted_tokens:  # what drafting adds beyond its rows of logits: rejection, and costlier rows
            rows_s = self.per_row_processing_s * timing.processed_rows
            extra = (timing.rest_s + timing.processing_s - rows_s - self.per_step_s) / timing.drafted_tokens
            self.per_draft_token_s = max(_ema(self.per_draft_token_s, extra), 0.0)
        else:
            self.per_step_s = _ema(self.per_step_s, timing.rest_s)
            if timing.processed_rows:
                self.per_row_processing_s = _ema(self.per_row_processing_s,
                                                 timing.processing_s / timing.processed_rows)

    @property
    def ratios(self) -> tuple[float, float]:
        """(c, v) at batch 1: a proposer pass (the EAGLE head's when loaded, else the draft model's) and each
        extra verified token, relative to one target forward."""
        one = self.target(1)
        proposer = self.eagle if self.eagle is not None else self.draft
        c = proposer(1) / one if proposer is not None else 0.0
        return c, (self.target(5) - one) / 4 / one


def median_time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def least_time(fn, repeats: int, min_seconds: float = 0.02) -> float:
    """The fastest of at least `repeats` runs (more while they take under `min_seconds` in all, up to 4×):
    interference only ever adds time, so the minimum is the cost of the work itself."""
    samples: list[float] = []
    while len(samples) < repeats or (sum(samples) < min_seconds and len(samples) < 4 * repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


TOKEN_SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 17, 24, 32, 33, 48, 49, 64, 65, 96, 97, 128, 129, 192, 193, 256)
ROW_SIZES = (1, 2, 4, 8, 16, 32, 64)
SWEEPS = 2  # every point is timed in each sweep; a stall must hit all of them to show


def calibrate_forward(runner: ModelRunner | HeadPasses, table: list[int], max_tokens: int, max_rows: int,
                      base_context: int, long_context: int, repeats: int) -> ForwardCost:
    """Time `runner` on a scratch sequence whose table holds `long_context` + `max_tokens` slots."""
    tokens = [t % runner.vocab_size for t in range(1, long_context + max_tokens + 1)]
    runner.logits([table], [tokens[:long_context]], [0], [1])  # write the scratch context; warms up

    def forward(num_tokens: int, rows: int, context: int) -> float:
        chunk = tokens[context: context + num_tokens]

        def run() -> None:
            runner.logits([table] * rows, [chunk] * rows, [context] * rows, [num_tokens] * rows)
            synchronize(runner.device)

        return least_time(run, repeats)

    token_sizes = [n for n in TOKEN_SIZES if n <= max_tokens] or [1]
    row_sizes = [r for r in ROW_SIZES if r <= max_rows]
    points = [(n, 1, base_context) for n in token_sizes] + [(1, r, base_context) for r in row_sizes[1:]]
    points += [(1, 1, long_context)] if long_context > base_context else []
    seconds = dict.fromkeys(points, float("inf"))
    for _ in range(SWEEPS):
        for point in points:
            seconds[point] = min(seconds[point], forward(*point))
    # More tokens never cost less: a point above a later one was disturbed (the suffix minimum drops it).
    token_seconds = np.minimum.accumulate([seconds[(n, 1, base_context)] for n in token_sizes][::-1])[::-1].tolist()
    # R one-token rows never cost more than R separate forwards: a bound that also catches a disturbed last point
    extra_rows = [min(seconds[(1, r, base_context)], r * token_seconds[0]) - _interp(r, token_sizes, token_seconds)
                  for r in row_sizes[1:]]
    row_seconds = [0.0] + np.minimum.accumulate(extra_rows[::-1])[::-1].tolist() if extra_rows else [0.0]
    per_context = (seconds[(1, 1, long_context)] - token_seconds[0]) / (long_context - base_context) \
        if long_context > base_context else 0.0
    return ForwardCost(token_sizes, token_seconds, row_sizes, row_seconds, max(per_context, 0.0), base_context)


def calibrate(target: ModelRunner, draft: ModelRunner | EagleRunner | None, block_manager: BlockManager,
              max_tokens: int = 256, max_rows: int = 32, base_context: int = 64, long_context: int = 512,
              repeats: int = 2) -> StepCostModel:
    """Measure the target's and the proposer's (a draft model or an EAGLE head) forward costs on a scratch
    sequence. Raises ValueError when the pool is too small."""
    table: list[int] = []
    slots = long_context + max_tokens
    if not block_manager.ensure_slots(table, slots):
        long_context = base_context
        slots = base_context + max_tokens
        if not block_manager.ensure_slots(table, slots):
            raise ValueError("the KV pool is too small to calibrate")
    try:
        target_cost = calibrate_forward(target, table, max_tokens, max_rows, base_context, long_context, repeats)
        if draft is None:
            return StepCostModel(target_cost, None)
        head = isinstance(draft, EagleRunner)
        draft_cost = calibrate_forward(HeadPasses(draft) if head else draft, table, max_tokens, max_rows,
                                       base_context, long_context, repeats)
        return StepCostModel(target_cost, None, eagle=draft_cost) if head else StepCostModel(target_cost, draft_cost)
    finally:
        block_manager.release(table)
