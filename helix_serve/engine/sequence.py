"""A request's tokens, KV bookkeeping, stop state and statistics."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from helix_serve.engine.detokenizer import SequenceText
from helix_serve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from helix_serve.engine.logits_processors import TokenCounts
    from helix_serve.engine.ngram_proposer import NgramIndex
    from helix_serve.engine.structured.grammar import Matcher


@dataclass(slots=True)
class Acceptance:
    """A proposer's decayed acceptance record on one sequence (planner.py reads and updates it)."""

    accepted: float = 0.0  # decayed accepted draft positions
    judged: float = 0.0  # decayed judged positions (up to and including the first rejection)
    steps_since: int = 0  # steps since this proposer was last scored on the sequence


def _acceptance_by_proposer() -> dict[str, Acceptance]:
    return {"draft": Acceptance(), "eagle": Acceptance(), "ngram": Acceptance(), "grammar": Acceptance()}


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class SequenceStats:
    """Timing and speculation counters of one request."""

    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_drafted: int = 0
    num_accepted: int = 0
    num_target_steps: int = 0  # target forwards that produced tokens (prefill + verify)
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int | None = None  # prompt tokens reused from the prefix cache; set at first admission
    # per_position_drafted[i] / per_position_accepted[i]: draft position i (0-based) tried / accepted
    per_position_drafted: list[int] = field(default_factory=list)
    per_position_accepted: list[int] = field(default_factory=list)
    by_proposer: dict[str, list[int]] = field(default_factory=dict)  # proposer -> [drafted, accepted]

    def record_verify(self, proposer: str, num_drafted: int, num_accepted: int) -> None:
        self.num_drafted += num_drafted
        self.num_accepted += num_accepted
        counts = self.by_proposer.setdefault(proposer, [0, 0])
        counts[0] += num_drafted
        counts[1] += num_accepted
        grow = num_drafted - len(self.per_position_drafted)
        if grow > 0:
            self.per_position_drafted.extend([0] * grow)
            self.per_position_accepted.extend([0] * grow)
        # positions after the first rejection were drafted but never judged; count the judged ones
        for i in range(min(num_accepted + 1, num_drafted)):
            self.per_position_drafted[i] += 1
            self.per_position_accepted[i] += int(i < num_accepted)

    def summary(self, num_generated: int) -> dict:
        """The per-request stats the API reports."""
        end = self.finish_time or time.perf_counter()
        elapsed = end - self.arrival_time
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival_time
        judged = sum(self.per_position_drafted)
        return {
            "tokens_generated": num_generated,
            "time_seconds": elapsed,
            "time_to_first_token": ttft,
            "tokens_per_second": num_generated / elapsed if elapsed > 0 else 0.0,
            "num_drafted": self.num_drafted,
            "num_accepted": self.num_accepted,
            "num_target_steps": self.num_target_steps,
            # accepted / drafted (vLLM's definition; drafts after the first rejection count as not accepted)
            "acceptance_rate": self.num_accepted / self.num_drafted if self.num_drafted else None,
            # α of Leviathan et al.: accepted / judged positions (positions up to the first rejection)
            "num_judged": judged,
            "alpha": sum(self.per_position_accepted) / judged if judged else None,
            # tokens emitted per target forward (accepted drafts + the target's own token); 1.0 = plain decoding
            "mean_accepted_length": num_generated / self.num_target_steps if self.num_target_steps else None,
            "per_position_acceptance": [
                a / d if d else None for a, d in zip(self.per_position_accepted, self.per_position_drafted)
            ],
            "per_position_accepted": list(self.per_position_accepted),  # counts, position 0 = the first draft
            "by_proposer": {name: {"num_drafted": d, "num_accepted": a} for name, (d, a) in self.by_proposer.items()},
            "num_preemptions": self.num_preemptions,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_cached_tokens": self.num_cached_tokens or 0,
        }


class KeptFeatures:
    """The target's features of the positions an EAGLE head has not consumed, kept as one copy per step and
    joined when the head reads them: joining every step copied the whole backlog (up to HEAD_BACKLOG positions)
    per sequence and step, ~1 ms a step at 32 rows. Copies, not views: a view would keep a step's whole
    feature tensor (a long prefill's too) alive for as long as any sequence trails it."""

    __slots__ = ("chunks", "rows")

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.rows = 0

    def __len__(self) -> int:
        return self.rows

    def append(self, fresh: torch.Tensor) -> None:
        self.chunks.append(fresh.clone())
        self.rows += len(fresh)

    def first(self, n: int) -> torch.Tensor:
        """[n, 3H]: the oldest n positions' features."""
        if len(self.chunks) > 1:
            self.chunks = [torch.cat(self.chunks)]
        return self.chunks[0][:n]

    def drop(self, n: int) -> None:
        """Forget the oldest n positions (the head consumed them)."""
        if n:
            self.chunks = [self.first(self.rows)[n:]]
            self.rows -= n


@dataclass(slots=True)
class Sequence:
    """One request inside the engine.

    KV invariant between steps: the target's pool holds K/V for all tokens but the last
    (`num_target_cached == len(token_ids) - 1` once running); the draft's pool lags arbitrarily and
    catches up on its next draft pass. Both share `block_table`, whose first blocks may be prefix-cache
    blocks shared with other sequences (`block_hashes` are their keys; see prefix_cache.py).

    Per-step work must not grow with the history, so what is derived from the tokens is kept here and
    grown by the new tokens only: the text, penalty counts, the prompt-lookup index, the blocks offered to
    the prefix cache. `token_ids` only ever grows (drafts are appended once accepted; preemption keeps them).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks of token_ids
    num_target_cached: int = 0
    num_draft_cached: int = 0  # with an EAGLE head: its entries fed the target's features (eagle_runner.py)
    eagle_features: KeptFeatures | None = None  # target features of positions num_draft_cached ..
    drafts_by_model: bool = True  # the engine's model proposer may ever draft for it (set by the engine)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    stats: SequenceStats = field(default_factory=SequenceStats)
    acceptance: dict[str, Acceptance] = field(default_factory=_acceptance_by_proposer)  # by proposer name
    text: SequenceText | None = None  # the output text (detokenizer.py); set from the prompt length
    penalty_counts: TokenCounts | None = None  # kept by logits_processors.Penalties for penalized requests
    ngram_index: NgramIndex | None = None  # kept by the n-gram proposer
    # the first num_registered_blocks blocks of block_table are offered to the prefix cache, the first
    # num_draft_written_blocks marked draft-written (prefix_cache.py); set again at each admission
    num_registered_blocks: int = 0
    num_draft_written_blocks: int = 0
    grammar: Matcher | None = None  # structured output: advanced by emitted tokens only (structured/masks.py)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.stats.num_prompt_tokens = len(self.prompt_token_ids)
        if self.text is None:
            self.text = SequenceText.after_prompt(len(self.prompt_token_ids))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_text(self) -> str:
        return self.text.text

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
