"""Prefix caching: exact block ids, ref counts and eviction; hash chain collisions; the draft rule; and
outputs token-identical with caching on and off (greedy, seeded sampling, ragged batches, preemption),
with no block leaked on any exit path."""

import time

import pytest
import torch

from helix_serve.engine.block_manager import BlockManager
from helix_serve.engine.prefix_cache import hash_block, root_hash
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.engine.sequence import Sequence
from helix_serve.serving.metrics import HelixMetrics
from tests.helpers import PROMPTS, make_engine

BS = 4  # block size of every test here


def seq(tokens) -> Sequence:
    return Sequence("r", list(tokens), SamplingParams(), torch.Generator())


def run(bm: BlockManager, tokens, verified: int, drafted: int = 0) -> Sequence:
    """Admit a sequence and pretend the target (and draft) computed its first tokens."""
    s = seq(tokens)
    assert bm.admit(s, bm.cached_prefix(s))
    s.num_target_cached, s.num_draft_cached = verified, drafted
    bm.cache_full_blocks(s)
    return s


def refs(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.allocator.blocks]


# ---- block manager: exact ids ----------------------------------------------------------------------------


def test_hits_reuse_full_blocks_and_never_the_last_token():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = run(bm, range(10), verified=9)
    assert a.block_table == [0, 1, 2] and bm.allocator.num_cached == 2  # block 2 is not full: not cached
    b = seq(range(8))  # 2 full blocks, but the last token must be computed: only block 0 is reused
    prefix = bm.cached_prefix(b)
    assert prefix.block_ids == [0] and prefix.num_tokens == 4
    c = seq([*range(9), 99])
    assert bm.admit(c, bm.cached_prefix(c))
    assert c.block_table == [0, 1, 3] and c.num_target_cached == 8 and refs(bm)[:4] == [2, 2, 1, 1]
    bm.release(a.block_table)
    bm.release(c.block_table)
    assert bm.num_used_blocks == 0 and bm.allocator.num_cached == 2
    # a's release frees only block 2 (c still holds 0 and 1); c's frees 3, 1, 0: tail first
    assert bm.allocator.free_order() == [4, 5, 6, 7, 2, 3, 1, 0]


def test_same_tokens_at_another_position_or_after_another_prefix_do_not_hit():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    run(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9], verified=8)
    cached = set(bm.allocator._cached)
    assert len(cached) == 2
    for tokens in ([5, 6, 7, 8, 1, 2, 3, 4, 9],  # both blocks, swapped
                   [9, 9, 9, 9, 5, 6, 7, 8, 9],  # block 1's tokens after another block 0
                   [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]):  # both blocks, one block later
        s = seq(tokens)
        assert bm.cached_prefix(s).block_ids == [] and cached.isdisjoint(bm.prefix_cache.block_hashes(s, 3))
    assert bm.cached_prefix(seq([1, 2, 3, 4, 5, 6, 7, 0, 9])).block_ids == [0]  # differs in block 1 only
    assert bm.cached_prefix(seq([1, 2, 3, 4, 5, 6, 7, 8, 0])).block_ids == [0, 1]
    other_pair = BlockManager(16, BS, enable_prefix_caching=True, cache_key="another model pair")
    run(other_pair, [1, 2, 3, 4, 5, 6, 7, 8, 9], verified=8)
    assert set(other_pair.allocator._cached).isdisjoint(bm.allocator._cached)
    root = root_hash("")
    assert hash_block(root, [1, 2, 3, 4]) == hash_block(root, (1, 2, 3, 4)) != hash_block(root, [1, 2, 3, 5])


def test_draft_starts_at_the_first_block_it_has_not_written():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    tokens = list(range(13))
    a = run(bm, tokens, verified=12, drafted=0)  # target wrote 3 blocks, the draft none yet
    b = seq(tokens)
    assert bm.admit(b, bm.cached_prefix(b)) and (b.num_target_cached, b.num_draft_cached) == (12, 0)
    a.num_draft_cached = 9  # a's draft caught up on two blocks
    bm.cache_full_blocks(a)
    assert [bm.allocator.blocks[i].draft_written for i in a.block_table] == [True, True, False, False]
    c = seq(tokens)
    assert bm.admit(c, bm.cached_prefix(c)) and (c.num_target_cached, c.num_draft_cached) == (12, 8)


def test_admission_counts_reused_free_blocks_and_evicts_instead_of_waiting():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = run(bm, range(13), verified=12)
    bm.release(a.block_table)
    assert bm.allocator.free_order() == [3, 2, 1, 0] and bm.allocator.num_cached == 3
    b = seq([0, 1, 2, 3, 4, 5, 6, 7, 50, 51, 52, 53, 54])  # hits blocks 0, 1 (free), needs 2 more
    assert bm.admit(b, bm.cached_prefix(b))
    assert b.block_table == [0, 1, 3, 2] and bm.allocator.num_cached == 2  # block 2 evicted
    c = seq([0, 1, 2, 3, 4])  # hit on block 0 (in use, shared) but no free block for the rest
    before = (refs(bm), bm.allocator.free_order())
    assert not bm.admit(c, bm.cached_prefix(c))
    assert (refs(bm), bm.allocator.free_order()) == before and c.block_table == []  # all or nothing
    bm.release(b.block_table)
    d = seq(range(100, 116))  # nothing cached: takes all 4 blocks, evicting every cached one
    assert bm.admit(d, bm.cached_prefix(d)) and d.block_table == [2, 3, 1, 0] and bm.allocator.num_cached == 0


def test_rollback_to_the_verified_length_keeps_cached_blocks():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    s = seq(range(9))
    assert bm.admit(s, bm.cached_prefix(s)) and bm.ensure_slots(s.block_table, 9 + 4)  # 4 draft slots
    s.num_target_cached = 9
    bm.cache_full_blocks(s)
    bm.truncate(s.block_table, s.num_target_cached)
    assert s.block_table == [0, 1, 2] and all(bm.allocator.blocks[b].block_hash for b in s.block_table[:2])


def test_each_full_block_is_offered_once_and_readmission_restarts_after_the_reused_prefix(monkeypatch):
    """Registration visits only the blocks that became full since the last step (it used to offer every
    block every step); a preempted sequence keeps its tokens, re-admits from what is still cached and
    registers only the blocks after that prefix."""
    bm = BlockManager(5, BS, enable_prefix_caching=True)
    offered, cache = [], bm.allocator.cache
    monkeypatch.setattr(bm.allocator, "cache", lambda block_id, h: offered.append(block_id) or cache(block_id, h))
    s = run(bm, range(10), verified=9, drafted=9)
    bm.cache_full_blocks(s)  # a step that verified nothing new offers nothing
    assert offered == [0, 1] and (s.num_registered_blocks, s.num_draft_written_blocks) == (2, 2)
    s.token_ids += range(10, 16)
    assert bm.ensure_slots(s.block_table, 16)
    s.num_target_cached, s.num_draft_cached = 15, 12
    bm.cache_full_blocks(s)
    assert offered == [0, 1, 2] and s.block_table == [0, 1, 2, 3] and s.num_draft_written_blocks == 3
    bm.release(s.block_table)  # preempted (Scheduler.preempt): the tokens stay, the blocks go
    s.num_target_cached = s.num_draft_cached = 0
    other = run(bm, range(100, 109), verified=0)  # takes blocks 4, 3, 2: block 2's hash is evicted
    assert other.block_table == [4, 3, 2]
    bm.release(other.block_table)
    assert bm.admit(s, bm.cached_prefix(s)) and s.block_table[:2] == [0, 1]
    assert (s.num_target_cached, s.num_registered_blocks, s.num_draft_written_blocks) == (8, 2, 2)
    s.num_target_cached = 15  # recomputed
    bm.cache_full_blocks(s)
    assert offered == [0, 1, 2, s.block_table[2]] and bm.allocator.blocks[s.block_table[2]].block_hash


def test_caching_off_finds_nothing_and_registers_nothing():
    bm = BlockManager(8, BS)
    run(bm, range(9), verified=8)
    assert bm.cached_prefix(seq(range(9))).block_ids == [] and bm.allocator.num_cached == 0
    assert bm.prefix_cache_usage() == {"cached_blocks": 0, "prefix_cache_queried_tokens": 0,
                                       "prefix_cache_hit_tokens": 0}


# ---- the engine: same tokens with caching on and off ------------------------------------------------------

FIXED_COSTS = dict(draft_cost_ratio=0.3, verify_cost_ratio=0.05)  # no calibration: same K choices on both


@pytest.fixture(scope="module")
def engines(llama_pair):
    return {on: make_engine(llama_pair, enable_prefix_caching=on, **FIXED_COSTS) for on in (True, False)}


@pytest.fixture(scope="module")
def shared(engines):
    """A 26-token shared prefix (6 full blocks) as token ids."""
    tok = engines[True].tokenizer
    return tok(PROMPTS[3] + " " + PROMPTS[7]).input_ids[:26]


def question(engine, i: int) -> list[int]:
    return engine.tokenizer(" " + PROMPTS[i]).input_ids


def assert_pool_clean(engine) -> None:
    alloc = engine.block_manager.allocator
    assert engine.kv_usage()["used_blocks"] == 0 and not engine.has_unfinished_requests()
    assert all(b.ref_count == 0 for b in alloc.blocks) and alloc.num_free == alloc.num_blocks
    assert all(alloc.blocks[b].block_hash == h for h, b in alloc._cached.items())


def mixed_params(n: int) -> list[SamplingParams]:
    """Ragged: greedy and seeded sampling, adaptive/fixed/no speculation, different lengths."""
    kinds = [dict(), dict(temperature=0.8, seed=7), dict(num_speculative_tokens=3), dict(speculative=False),
             dict(temperature=1.0, top_p=0.9, seed=3, num_speculative_tokens=2)]
    return [SamplingParams(max_tokens=10 + 3 * i, ignore_eos=True, **kinds[i % len(kinds)]) for i in range(n)]


def test_outputs_identical_with_caching_on_and_off(engines, shared):
    prompts = [shared + question(engines[True], i) for i in range(5)]
    params = mixed_params(5)
    rounds = {}
    for on, engine in engines.items():
        rounds[on] = [engine.generate(prompts, params) for _ in range(2)]  # the second round reuses the first's
        assert_pool_clean(engine)
    tokens = {on: [[o.token_ids for o in r] for r in rs] for on, rs in rounds.items()}
    assert tokens[True] == tokens[False]
    assert all(o.stats["num_cached_tokens"] >= 24 for o in rounds[True][1])
    assert all(o.stats["num_cached_tokens"] == 0 for r in rounds[False] for o in r)
    usage = engines[True].kv_usage()
    assert usage["cached_blocks"] > 0 and usage["prefix_cache_hit_tokens"] >= 5 * 24


def test_second_request_reuses_the_prefix_and_reports_it(engines, shared):
    engine = engines[True]
    before = engine.kv_usage()
    prompt = shared + question(engine, 6)
    [first] = engine.generate([prompt], SamplingParams(max_tokens=8))
    [again] = engine.generate([prompt], SamplingParams(max_tokens=8))
    assert again.token_ids == first.token_ids
    n = len(prompt)
    assert again.stats["num_cached_tokens"] == (n - 1) // 4 * 4 and again.stats["num_prompt_tokens"] == n
    after = engine.kv_usage()
    assert after["prefix_cache_queried_tokens"] - before["prefix_cache_queried_tokens"] == 2 * n
    hits = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    assert hits == first.stats["num_cached_tokens"] + again.stats["num_cached_tokens"]
    assert_pool_clean(engine)


def test_samples_of_one_prompt_admitted_together_prefill_it_once(engines):
    """OpenAI's n: the first sample prefills the prompt; the others wait one step and reuse its blocks."""
    prompt = [5, 6, 7, 8, 5, 6] + question(engines[True], 4)  # a first block no other test has cached
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=s, ignore_eos=True) for s in range(3)]
    outs = {on: engine.generate([prompt] * 3, params) for on, engine in engines.items()}
    n = len(prompt)
    assert [o.stats["num_cached_tokens"] for o in outs[True]] == [0, (n - 1) // 4 * 4, (n - 1) // 4 * 4]
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
    assert len({tuple(o.token_ids) for o in outs[True]}) == 3
    assert_pool_clean(engines[True])


def test_samples_of_one_prompt_admitted_together_draft_it_once(engines, monkeypatch):
    """The siblings are admitted before the first sample's draft has written the prompt: they must pick up its
    draft K/V once it has, not compute the prompt again in the draft."""
    engine = engines[True]
    prompt = [9, 8, 7, 6, 9, 8] + question(engine, 1)  # a first block no other test has cached
    computed = {"target": 0, "draft": 0}  # prompt positions each model ran over

    def counting(name, runner):
        logits = runner.logits

        def wrapped(block_tables, chunks, starts, num_logits):
            computed[name] += sum(max(0, min(len(prompt), s + len(c)) - s) for c, s in zip(chunks, starts))
            return logits(block_tables, chunks, starts, num_logits)
        monkeypatch.setattr(runner, "logits", wrapped)

    counting("target", engine.decoder.target)
    counting("draft", engine.decoder.draft)
    # seeded sampling: every step after the prefill runs the draft model (speculative.py)
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=s, num_speculative_tokens=2, ignore_eos=True)
              for s in range(4)]
    outs = engine.generate([prompt] * 4, params)
    n, cached = len(prompt), (len(prompt) - 1) // 4 * 4
    assert [o.stats["num_cached_tokens"] for o in outs] == [0, cached, cached, cached]
    assert computed == {"target": n + 3 * (n - cached), "draft": n + 3 * (n - cached)}
    assert [o.token_ids for o in outs] == [o.token_ids for o in engines[False].generate([prompt] * 4, params)]
    assert_pool_clean(engine)


def test_rollbacks_never_drop_a_cached_block(engines, shared, monkeypatch):
    engine = engines[True]
    bm = engine.block_manager
    truncate = bm.truncate
    dropped: list[int] = []

    def checked(table, num_tokens):
        if num_tokens > 0:  # a rollback, not a release
            dropped.extend(table[bm.blocks_for(num_tokens):])
            assert all(bm.allocator.blocks[b].block_hash is None for b in table[bm.blocks_for(num_tokens):])
        truncate(table, num_tokens)

    monkeypatch.setattr(bm, "truncate", checked)
    engine.generate([shared + question(engine, i) for i in range(4)],
                    SamplingParams(max_tokens=24, ignore_eos=True, num_speculative_tokens=6))
    assert dropped  # rejections did roll back
    assert_pool_clean(engine)


def test_a_reused_prefix_without_draft_kv_is_recomputed_by_the_draft(engines, shared):
    """The first request never drafts, so the draft pool holds nothing for the prefix; garbage there must
    not reach the second request, whose seeded sampling depends on the draft's distributions."""
    on, off = engines[True], engines[False]
    prefix = on.tokenizer(PROMPTS[5] + " " + PROMPTS[1]).input_ids  # no other test starts with it
    on.generate([prefix + question(on, 0)], SamplingParams(max_tokens=4, speculative=False))
    draft_kv = on.decoder.draft.kv_cache
    draft_kv.k.normal_(0, 30)
    draft_kv.v.normal_(0, 30)
    try:
        check_draft_rule(on, off, prefix)
    finally:  # the poison hit blocks other tests cached: make every draft reader recompute them
        draft_kv.k.zero_()
        draft_kv.v.zero_()
        for block in on.block_manager.allocator.blocks:
            block.draft_written = False


def check_draft_rule(on, off, prefix):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=11, num_speculative_tokens=4, ignore_eos=True)
    request_id = on.add_request(prefix + question(on, 2), params)
    on.step()
    seq = on.seqs[request_id]
    assert seq.stats.num_cached_tokens >= 24 and seq.num_draft_cached == 0
    outs = {}
    while on.has_unfinished_requests():
        outs.update((o.request_id, o) for o in on.step() if o.finished)
    [reference] = off.generate([prefix + question(off, 2)], params)
    assert outs[request_id].token_ids == reference.token_ids
    assert outs[request_id].stats["num_accepted"] == reference.stats["num_accepted"]
    # now the draft has written that prompt: a request that extends it starts its draft there too
    request_id = on.add_request(prefix + question(on, 2) + question(on, 6), params)
    on.step()
    seq = on.seqs[request_id]
    assert seq.num_draft_cached == seq.stats.num_cached_tokens >= 24  # the first step was the target's alone
    while on.has_unfinished_requests():
        on.step()
    assert_pool_clean(on)


def test_preemption_in_a_tiny_pool_gives_the_same_tokens(llama_pair, engines, shared):
    prompts = [shared + question(engines[False], i) for i in range(6)]
    # NOTE: seeded sampling *with* speculation follows the K chosen each step, and a short pool changes K;
    # greedy (any K) and sampling without speculation give the same tokens whatever the pool does.
    kinds = [dict(), dict(temperature=0.8, seed=5, speculative=False), dict(num_speculative_tokens=3)]
    params = [SamplingParams(max_tokens=12 + 3 * i, ignore_eos=True, **kinds[i % 3]) for i in range(6)]
    [reference] = [[o.token_ids for o in engines[False].generate(prompts, params)]]
    for on in (True, False):
        tiny = make_engine(llama_pair, num_kv_blocks=30, enable_prefix_caching=on, **FIXED_COSTS)
        outs = tiny.generate(prompts, params)
        assert [o.token_ids for o in outs] == reference
        assert sum(o.stats["num_preemptions"] for o in outs) > 0
        assert_pool_clean(tiny)
        if on:
            assert tiny.kv_usage()["prefix_cache_hit_tokens"] > 0


def test_no_block_leaks_on_abort_deadline_failed_step_oom_and_stop(engines, shared, monkeypatch):
    engine = engines[True]
    greedy = SamplingParams(max_tokens=30, ignore_eos=True)
    prompts = [shared + question(engine, i) for i in range(3)]
    engine.generate(prompts[:1], greedy)  # warm the cache
    # abort while running and while waiting
    ids = [engine.add_request(p, greedy) for p in prompts]
    engine.step()
    engine.step()
    for request_id in ids:
        assert engine.abort_request(request_id)
    assert_pool_clean(engine)
    # deadline, once running
    engine.add_request(prompts[1], SamplingParams(max_tokens=30, ignore_eos=True, timeout_s=0.05))
    engine.step()
    assert engine.kv_usage()["used_blocks"] > 0
    time.sleep(0.1)
    [expired] = engine.step()
    assert expired.finish_reason == "timeout"
    assert_pool_clean(engine)
    # a failed step, then an out-of-memory step (batch of 3: preempted, then they finish)
    calls = {"n": 0}
    step = engine.decoder.step

    def failing(seqs, ks):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        if calls["n"] == 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate")
        return step(seqs, ks)

    monkeypatch.setattr(engine.decoder, "step", failing)
    failed = engine.generate(prompts, greedy)
    assert all(o.finish_reason == "error" for o in failed)
    assert_pool_clean(engine)
    survived = engine.generate(prompts, greedy)
    assert all(o.finish_reason == "length" for o in survived) and engine.scheduler.max_num_seqs < 32
    assert_pool_clean(engine)
    monkeypatch.undo()
    engine.scheduler.max_num_seqs = engine.config.max_num_seqs
    # stop strings end a sequence mid-chunk: same tokens as without caching
    text = survived[0].text
    stop = SamplingParams(max_tokens=30, ignore_eos=True, stop=[text[10:13]])
    on = engine.generate(prompts[:1], stop)[0]
    off = engines[False].generate(prompts[:1], stop)[0]
    assert on.token_ids == off.token_ids and on.finish_reason == "stop"
    assert_pool_clean(engine)


def test_live_tokens_count_a_shared_prefix_once(engines):
    engine = engines[True]
    prompt = [4, 3, 2, 1, 4, 3] + question(engine, 7)  # a first block no other test has cached
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=s, ignore_eos=True) for s in range(4)]
    ids = [engine.add_request(prompt, p) for p in params]
    for _ in range(3):  # the first sample prefills, the others join on the next step, then all decode
        engine.step()
    seqs = [engine.seqs[i] for i in ids]
    cached = (len(prompt) - 1) // 4 * 4  # the blocks the siblings share with the first sample
    usage = engine.kv_usage()
    assert usage["num_running"] == 4 and [s.stats.num_cached_tokens for s in seqs] == [0, cached, cached, cached]
    assert usage["live_tokens"] == cached + sum(s.num_target_cached - cached for s in seqs)
    assert usage["live_tokens"] <= usage["used_blocks"] * usage["block_size"]
    while engine.has_unfinished_requests():
        engine.step()
    assert_pool_clean(engine)


def test_metrics_count_queried_and_hit_prompt_tokens():
    metrics = HelixMetrics()
    metrics.observe_generation("/generate", 0.1, 0.2, {"num_prompt_tokens": 100, "num_cached_tokens": 0})
    metrics.observe_generation("/generate", 0.1, 0.2, {"num_prompt_tokens": 100, "num_cached_tokens": 96})
    metrics.set_kv_usage({"used_blocks": 1, "free_blocks": 7, "cached_blocks": 6})
    text = metrics.render().decode()
    assert "helix_prefix_cache_queried_tokens_total 200.0" in text
    assert "helix_prefix_cache_hit_tokens_total 96.0" in text
    assert "helix_prefix_cache_hit_rate 0.48" in text
    assert 'helix_kv_blocks{state="cached"} 6.0' in text


def test_an_eagle_heads_last_matched_block_is_copied_and_its_last_position_recomputed():
    """With an EAGLE head, the head's entry at the last matched position read the writer's next token: the block
    is copied (even when free and cached, before anything can evict it) and its last token recomputed there."""
    bm = BlockManager(6, BS, enable_prefix_caching=True, draft_needs_features=True)
    copies = []
    bm.copy_block = lambda source, dest: copies.append((source, dest))
    a = run(bm, range(13), verified=12, drafted=12)  # target and head wrote 3 blocks
    bm.release(a.block_table)  # all free, still cached: the copy must not evict its source first
    b = seq([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 99, 98])  # matches 3 blocks, then other tokens
    prefix = bm.cached_prefix(b)
    assert prefix.copy_last and prefix.block_ids == [0, 1, 2] and prefix.num_tokens == prefix.num_draft_tokens == 11
    assert bm.admit(b, prefix)
    assert copies == [(2, b.block_table[2])] and b.block_table[:2] == [0, 1] and b.block_table[2] != 2
    assert (b.num_target_cached, b.num_draft_cached) == (11, 11)
    assert bm.allocator.blocks[2].ref_count == 0 and bm.allocator.blocks[2].block_hash is not None  # kept, cached
    assert refs(bm)[:2] == [1, 1]
    bm.release(b.block_table)
    bm2 = BlockManager(6, BS, enable_prefix_caching=True, draft_needs_features=True)
    run(bm2, range(13), verified=12, drafted=8)  # the head wrote 2 of the 3 blocks
    c = seq(range(14))
    prefix = bm2.cached_prefix(c)  # the head's entries in blocks 0-1 read c's next tokens: shared, none copied
    assert not prefix.copy_last and prefix.block_ids == [0, 1] and prefix.num_tokens == prefix.num_draft_tokens == 8


def test_an_eagle_heads_block_is_shared_whole_where_its_writer_read_the_same_next_token():
    """The head's entry at a block's last position read the writer's next token: the same prompt again (or n
    samples of it) reads the same, so its blocks are shared whole — the head's engine used to recompute one token
    and copy a block at every such hit (32 streams, int4: one prefill token in six). Where a writer read another
    token, reuse stops at that block, which is copied and its last position recomputed."""
    bm = BlockManager(16, BS, enable_prefix_caching=True, draft_needs_features=True)
    copies = []
    bm.copy_block = lambda source, dest: copies.append((source, dest))
    a = run(bm, range(14), verified=13, drafted=13)  # target and head wrote 3 blocks
    assert [bm.allocator.blocks[b].next_token for b in a.block_table[:3]] == [4, 8, 12]
    same = seq(range(14))
    prefix = bm.cached_prefix(same)
    assert prefix.block_ids == a.block_table[:3] and not prefix.copy_last
    assert prefix.num_tokens == prefix.num_draft_tokens == 12
    assert bm.admit(same, prefix) and copies == [] and same.block_table[:3] == a.block_table[:3]
    # a middle block whose writer read another next token (it diverged right after the block, and another
    # request cached the block after it): reuse stops there, with a copy
    bm.allocator.blocks[a.block_table[1]].next_token = 99
    other = seq(range(14))
    prefix = bm.cached_prefix(other)
    assert prefix.block_ids == a.block_table[:2] and prefix.copy_last and prefix.num_tokens == 7


def test_a_prefix_cached_without_head_kv_is_taken_over_by_a_block_with_them():
    """An EAGLE engine reuses only blocks holding the head's K/V. A prompt first cached by a request the head never
    follows (speculation off) held its hash without them, and the blocks of every later request the head follows
    stayed private: nothing was reused, and every such request waited a step for the "sibling" prefilling it
    (int4, 16 streams, 2-core Xeon: the head's engine with speculation off ran 170 tokens/s against 243 for the
    draft model's). The first follower whose head writes the block takes the hash over; the next one reuses it,
    for both models."""
    bm = BlockManager(16, BS, enable_prefix_caching=True, draft_needs_features=True)
    plain = seq(range(13))
    plain.drafts_by_model = False
    assert bm.admit(plain, bm.cached_prefix(plain))
    plain.num_target_cached = 12
    bm.cache_full_blocks(plain)  # cached: target K/V only
    follower = seq(range(13))
    assert bm.cached_prefix(follower).block_ids == []  # the head's K/V are not there
    again = seq(range(13))
    again.drafts_by_model = False
    assert bm.cached_prefix(again).block_ids == plain.block_table[:3]  # a request the head never drafts for
    bm.admit(follower, bm.cached_prefix(follower))
    follower.num_target_cached = follower.num_draft_cached = 12
    bm.cache_full_blocks(follower)
    later = seq(range(13))
    prefix = bm.cached_prefix(later)
    # the head's entry at position 11 read token 12, and so does later's: all 3 blocks shared, none copied
    assert prefix.block_ids == follower.block_table[:3] and prefix.num_draft_tokens == 12 and not prefix.copy_last
