"""Continuous batching: running sequences keep their place, waiting ones join when blocks allow.

Each step every running sequence reserves slots for its uncached tokens plus its K draft tokens.
When the pool is short a sequence first gives up speculation (K = 0); if that is not enough the
newest running sequence is preempted: its blocks are freed and it is recomputed from its tokens later.
A waiting sequence starts from the longest prefix the prefix cache holds (when enabled), so it
prefills only the rest; free blocks include cached ones that allocation may evict. A sequence whose next
full block another one admitted in the same step is about to prefill waits one step and reuses it: n
samples of one prompt prefill it once. The draft writes a prompt's K/V in the first sample's second step
(its first catch-up), after the others were admitted; each step a running sequence picks up the shared blocks
whose draft K/V has appeared since, so the draft too computes the prompt once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice

from helix_serve.engine.block_manager import BlockManager
from helix_serve.engine.prefix_cache import CachedPrefix
from helix_serve.engine.sequence import Sequence, SequenceStatus

ChooseK = Callable[[Sequence, int], int]  # (sequence, number running) -> K


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, choose_k: ChooseK) -> tuple[list[Sequence], list[int]]:
        """The sequences of the next step and their K."""
        scheduled, ks = self._schedule_running(choose_k)
        used = sum(s.num_tokens - s.num_target_cached + k for s, k in zip(scheduled, ks))
        for seq, prefix in self._admissible(self.max_num_batched_tokens - used, bool(scheduled)):
            if not self.block_manager.admit(seq, prefix):
                break
            if seq.stats.num_cached_tokens is None:
                seq.stats.num_cached_tokens = prefix.num_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(seq)
            ks.append(0)  # the first step is the target's prefill; the draft catches up next step
        return scheduled, ks

    def admissions(self) -> list[tuple[Sequence, int]]:
        """The waiting sequences the next step would admit if every running one took K = 0, with the tokens each
        would prefill: the planner prices its drafts beside them (and leaves them room). The pool is not asked
        (admitting would take blocks): where it is short, fewer join than this says, and the step is cheaper than
        the planner thought, never dearer."""
        used = sum(s.num_tokens - s.num_target_cached for s in self.running)
        return [(seq, seq.num_tokens - prefix.num_tokens)
                for seq, prefix in self._admissible(self.max_num_batched_tokens - used, bool(self.running))]

    def _admissible(self, budget: int, scheduled: bool) -> Iterator[tuple[Sequence, CachedPrefix]]:
        """Waiting sequences in order, each with the cached prefix it would start from, while seats, the token
        budget and the sibling rule allow (the caller admits each before asking for the next)."""
        prefilling: set[bytes] = set()  # the first uncached block of each sequence admitted this step
        seats = max(self.max_num_seqs - len(self.running), 0)
        for seq in list(islice(self.waiting, seats)):  # a copy: the caller pops each admitted one
            prefix = self.block_manager.cached_prefix(seq)
            missing = self.block_manager.first_missing_block(seq, prefix)
            if missing in prefilling:
                return  # a sibling (same prompt, e.g. OpenAI's n) prefills it now: reuse its blocks next step
            need = seq.num_tokens - prefix.num_tokens
            if need > budget and scheduled:
                return
            if missing is not None:
                prefilling.add(missing)
            yield seq, prefix
            budget -= need
            scheduled = True

    def _schedule_running(self, choose_k: ChooseK) -> tuple[list[Sequence], list[int]]:
        scheduled, ks = [], []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            self.block_manager.reuse_draft_blocks(seq)
            k = choose_k(seq, len(self.running))
            while not self.block_manager.ensure_slots(seq.block_table, seq.num_tokens + k):
                if k > 0:
                    k = 0
                    continue
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                scheduled.append(seq)
                ks.append(k)
        return scheduled, ks

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it is recomputed from its tokens when it runs again."""
        self.running.remove(seq)
        self.block_manager.release(seq.block_table)
        seq.num_target_cached = seq.num_draft_cached = 0
        seq.status = SequenceStatus.WAITING
        seq.stats.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove the sequence wherever it is and return its blocks (every exit path comes here)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.release(seq.block_table)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
