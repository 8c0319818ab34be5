"""The scheduler's preview of a step's admissions (what the planner prices its drafts beside) against the
admissions the step then makes."""

import torch

from helix_serve.engine.block_manager import BlockManager
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.engine.scheduler import Scheduler
from helix_serve.engine.sequence import Sequence

BS = 4


def seq(request_id: str, tokens) -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(), torch.Generator())


def test_admissions_preview_what_a_step_at_k0_admits_and_take_nothing():
    bm = BlockManager(64, BS, enable_prefix_caching=True)
    scheduler = Scheduler(bm, max_num_seqs=5, max_num_batched_tokens=40)
    running = seq("running", range(100, 110))
    scheduler.add(running)
    scheduler.schedule(lambda s, n: 0)
    running.num_target_cached = running.num_tokens - 1  # decoding: one uncached token a step
    bm.cache_full_blocks(running)
    # a prompt sharing the running one's first 2 blocks; 2 samples of one prompt (the second waits for the first's
    # blocks); one that no longer fits the step's token budget
    cached = seq("cached", [*range(100, 108), 1, 2, 3])
    sample_a, sample_b = seq("a", range(200, 212)), seq("b", range(200, 212))
    late = seq("late", range(300, 334))
    for s in (cached, sample_a, sample_b, late):
        scheduler.add(s)
    free = bm.allocator.num_free
    preview = scheduler.admissions()
    assert [(s.request_id, n) for s, n in preview] == [("cached", 3), ("a", 12)]
    assert bm.allocator.num_free == free and list(scheduler.waiting) == [cached, sample_a, sample_b, late]
    scheduled, ks = scheduler.schedule(lambda s, n: 0)
    assert scheduled == [running, cached, sample_a] and ks == [0, 0, 0]
    assert [s.num_tokens - s.num_target_cached for s in scheduled[1:]] == [n for _, n in preview]
    # the next step: sample b reuses a's blocks; the budget, then the seats, leave late out
    for s in scheduled[1:]:
        s.num_target_cached = s.num_tokens - 1  # prefilled: decoding now
        bm.cache_full_blocks(s)
    assert [(s.request_id, n) for s, n in scheduler.admissions()] == [("b", 4)]  # late: 34 > 40 - 3 - 4
    scheduler.max_num_batched_tokens = 2048
    assert [s.request_id for s, _ in scheduler.admissions()] == ["b", "late"]
    scheduler.max_num_seqs = 4
    assert [s.request_id for s, _ in scheduler.admissions()] == ["b"]
