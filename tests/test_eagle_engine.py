"""The engine's `eagle` proposer: a head on the target's features drafting in its own paged pool."""

from __future__ import annotations

import pytest
import torch

from helix_serve.engine.sampling_params import SamplingParams
from tests.helpers import PROMPTS, make_engine


def eagle_engine(llama_pair, eagle_dir, **overrides):
    """The tiny target with the random head, speculative_method eagle; configured costs (no calibration)."""
    return make_engine((llama_pair[0], None), draft_model=None, eagle_head=str(eagle_dir), speculative_method="eagle",
                       draft_cost_ratio=0.05, verify_cost_ratio=0.05, **overrides)


def test_eagle_greedy_is_target_greedy_on_a_ragged_batch(llama_pair, eagle_dir):
    engine = eagle_engine(llama_pair, eagle_dir)
    spec = engine.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True, num_speculative_tokens=3))
    plain = engine.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True, speculative=False))
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    drafted = sum(o.stats["by_proposer"].get("eagle", {}).get("num_drafted", 0) for o in spec)
    assert drafted > 0 and all(set(o.stats["by_proposer"]) <= {"eagle"} for o in spec)
    assert sum(o.stats["num_accepted"] for o in spec) > 0  # the head's own drafts were verified, some accepted
    assert engine.decoder.draft.kv_cache.k.abs().sum() > 0  # its K/V went to its own pool
    assert engine.block_manager.num_free_blocks == engine.block_manager.allocator.num_blocks


def test_eagle_blocks_are_freed_on_abort_and_other_requests_stay_exact(llama_pair, eagle_dir):
    engine = eagle_engine(llama_pair, eagle_dir, block_size=4, num_kv_blocks=64)
    params = SamplingParams(max_tokens=20, ignore_eos=True, num_speculative_tokens=2)
    kept = engine.add_request(PROMPTS[0], params)
    gone = engine.add_request(PROMPTS[3], params)
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < 64
    assert engine.abort_request(gone)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    [plain] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, ignore_eos=True, speculative=False))
    assert finals[kept].token_ids == plain.token_ids
    assert engine.block_manager.num_free_blocks == 64


def test_eagle_method_needs_a_head(llama_pair):
    engine = make_engine((llama_pair[0], None), draft_model=None, draft_cost_ratio=0.05, verify_cost_ratio=0.05)
    with pytest.raises(ValueError, match="EAGLE head"):
        engine.add_request("the quick", SamplingParams(speculative_method="eagle"))


def test_cli_generates_with_an_eagle_head(llama_pair, eagle_dir, capsys):
    from helix_serve.cli import main

    code = main(["generate", "the quick brown", "--raw", "--target", str(llama_pair[0]), "--eagle-head",
                 str(eagle_dir), "--method", "eagle", "--k", "3", "--max-tokens", "12", "--dtype", "float32",
                 "--device", "cpu", "--json"])
    import json

    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["tokens_generated"] == len(out["token_ids"]) > 0
    assert set(out["by_proposer"]) == {"eagle"} and out["by_proposer"]["eagle"]["num_drafted"] > 0


def test_eagle_blocks_are_freed_under_preemption_and_outputs_stay_exact(llama_pair, eagle_dir):
    """20 blocks of 4 tokens cannot hold 8 sequences at once: preempted ones recompute (the head catches up from
    the recompute prefill's features) and every block, the head's K/V included, is free at the end."""
    engine = eagle_engine(llama_pair, eagle_dir, num_kv_blocks=20)
    params = SamplingParams(max_tokens=24, ignore_eos=True, num_speculative_tokens=3)
    spec = engine.generate(PROMPTS, params)
    assert sum(o.stats["num_preemptions"] for o in spec) > 0
    assert engine.kv_usage()["used_blocks"] == 0 and not engine.scheduler.running
    plain = engine.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True, speculative=False))
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert all(o.stats["by_proposer"]["eagle"]["num_drafted"] > 0 for o in spec)


def test_the_heads_passes_are_calibrated_and_refreshed_as_its_own_curve(llama_pair, eagle_dir):
    engine = make_engine((llama_pair[0], None), draft_model=None, eagle_head=str(eagle_dir), max_num_seqs=2,
                         max_model_len=128)
    costs = engine.step_costs
    assert costs.draft is None and costs.eagle is not None and engine.planner.model.value == "eagle"
    assert engine.cost_ratios[0] == costs.eagle(1) / costs.target(1)
    before = costs.eagle.scale
    [out] = engine.generate(["the quick brown"], SamplingParams(max_tokens=12, ignore_eos=True,
                                                                num_speculative_tokens=2))
    assert "eagle" in out.stats["by_proposer"] and costs.eagle.scale != before  # hybrid: the head and lookup


def _head_keys(engine, prompt: list[int], params: SamplingParams):
    """Run `prompt` until the head has caught up past it; its head K/V entries for the prompt's positions
    (read through the sequence's block table), then finish it. Returns (keys, the finished output)."""
    request_id = engine.add_request(prompt, params)
    seq = engine.seqs[request_id]
    outputs = []
    while seq.num_draft_cached < len(prompt):
        outputs += engine.step()
    size, k = engine.config.block_size, engine.decoder.draft.kv_cache.k
    keys = torch.stack([k[:, seq.block_table[t // size], t % size] for t in range(len(prompt) - 1)])
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return keys, next(o for o in outputs if o.request_id == request_id and o.finished)


def test_prefix_cache_hits_reuse_only_the_heads_own_kv(llama_pair, eagle_dir):
    """A prompt served from another one's cached blocks has the head K/V it would have computed on an empty
    cache: reused only where the head wrote it and where it is this prompt's own (the head's entry at a block's
    last position read the next token: the last matched block is copied and that position recomputed, leaving
    the cached original as it was). Its drafts and greedy output are then those of an empty cache, and the
    target's."""
    engine = eagle_engine(llama_pair, eagle_dir)
    ids = engine.tokenizer("paged attention reads keys and values through a block table and the quick brown fox "
                           "jumps over").input_ids
    common = ids[: len(ids) // 4 * 4]  # whole blocks of 4
    first, second = common + ids[1:3], common + ids[3:5]  # the same blocks, then different next tokens
    assert ids[1] != ids[3]
    params = SamplingParams(max_tokens=16, ignore_eos=True, num_speculative_tokens=3)
    fresh_keys, fresh = _head_keys(eagle_engine(llama_pair, eagle_dir), second, params)  # an empty cache
    engine.generate([first], params)
    allocator = engine.block_manager.allocator
    cached = {b.block_id: b.block_hash for b in allocator.blocks if b.block_hash is not None}
    pools = [p for kv in (engine.decoder.target.kv_cache, engine.decoder.draft.kv_cache) for p in (kv.k, kv.v)]
    before = [pool[:, list(cached)].clone() for pool in pools]
    hit_keys, hit = _head_keys(engine, second, params)
    assert hit.stats["num_cached_tokens"] == len(common) - 1  # every matched token but the last block's last
    torch.testing.assert_close(hit_keys, fresh_keys)
    for pool, was in zip(pools, before):  # a cached block's K/V never changes: the recomputed position went to a copy
        assert torch.equal(pool[:, list(cached)], was)
    assert all(allocator.blocks[b].block_hash == h for b, h in cached.items())
    counts = [o.stats["by_proposer"]["eagle"] for o in (hit, fresh)]
    assert counts[0] == counts[1] and counts[0]["num_drafted"] > 0
    [plain] = engine.generate([second], SamplingParams(max_tokens=16, ignore_eos=True, speculative=False))
    assert hit.token_ids == plain.token_ids
    assert engine.kv_usage()["used_blocks"] == 0


def test_with_an_int4_target_the_head_drafts_in_int4_too(llama_pair, eagle_dir):
    """Its passes then stream a quarter of the bytes (the cost ratio that decides whether it pays); its q is
    whatever it computes, so sampling stays exact; its logits stay those of the head up to 4-bit rounding."""
    from helix_serve.model.eagle_head import EagleHead
    from helix_serve.model.int4 import Int4Linear, quantizable

    engine = eagle_engine(llama_pair, eagle_dir, quantization="int4")
    head = engine.decoder.draft.head
    layers = [getattr(head, n) for n in ("fc", "qkv", "o", "gate_up", "down", "lm_head")]
    assert all(isinstance(layer, Int4Linear) or not quantizable(layer) for layer in layers)
    assert sum(isinstance(layer, Int4Linear) for layer in layers) == 5  # the tiny sub-vocabulary (150) is not
    # with int4_dense_rows, the head's wide passes (prompt catch-ups) take the bf16 copies from the target's width
    wide = eagle_engine(llama_pair, eagle_dir, quantization="int4", int4_dense_rows=8).decoder.draft.head
    assert {getattr(wide, n).dense_rows for n in ("fc", "qkv", "o", "gate_up", "down")} == {8}
    assert all(layer.dense is None and layer.dense_rows == 0 for layer in layers if isinstance(layer, Int4Linear))
    exact = EagleHead.load(eagle_dir, engine.pair.target.embed_tokens, head.dtype)
    features = torch.randn(6, 3 * head.config.hidden_size, dtype=head.dtype)
    cosine = torch.nn.functional.cosine_similarity(head.fuse(features).float(), exact.fuse(features).float())
    assert cosine.min() > 0.99
    outs = engine.generate(PROMPTS[:4], SamplingParams(max_tokens=16, ignore_eos=True, num_speculative_tokens=3))
    assert all(len(o.token_ids) == 16 and o.stats["by_proposer"]["eagle"]["num_drafted"] > 0 for o in outs)
    assert engine.kv_usage()["used_blocks"] == 0


def test_the_head_catches_up_on_the_prompt_in_the_prefill_step(llama_pair, eagle_dir):
    """While the head drafts at this load (here for another request), it runs over each prompt right after its
    prefill, so a long prompt's catch-up is never charged to a drafting step (which would make drafting look too
    expensive to the planner for good); without drafts the head waits, but at most HEAD_BACKLOG tokens, so the
    target features a sequence keeps stay bounded however long it decodes."""
    from helix_serve.engine.speculative import HEAD_BACKLOG

    engine = eagle_engine(llama_pair, eagle_dir, num_kv_blocks=128)
    prompt = engine.tokenizer(PROMPTS[3] + " " + PROMPTS[7]).input_ids
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=2 * HEAD_BACKLOG + 8, ignore_eos=True,
                                                           num_speculative_tokens=0))
    engine.add_request(engine.tokenizer(PROMPTS[1]).input_ids, SamplingParams(
        max_tokens=4 * HEAD_BACKLOG, ignore_eos=True, num_speculative_tokens=2))  # the head in use
    seq = engine.seqs[request_id]
    engine.step()  # the prefill
    assert seq.num_draft_cached == len(prompt) - 1 and len(seq.eagle_features) == 1
    engine.step()  # K = 0: no head pass
    assert seq.num_draft_cached == len(prompt) - 1
    kept = []
    while request_id in engine.seqs:
        engine.step()
        kept.append(len(seq.eagle_features))
    assert max(kept) <= HEAD_BACKLOG + 1 and seq.num_draft_cached > len(prompt) + HEAD_BACKLOG
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_usage()["used_blocks"] == 0


def test_an_idle_head_waits_longer_to_catch_up_and_stays_exact_when_it_drafts_again(llama_pair, eagle_dir):
    """Under a load where the head does not pay (here: K = 0 for a while), catching it up every HEAD_BACKLOG tokens
    of every sequence buys nothing. Idle, it catches up on prompts only (their blocks' head K/V make the prefix
    cache work for it) and keeps the features after; a request it drafts for later catches it up in its first
    drafting pass, and greedy output stays the target's."""
    from helix_serve.engine.speculative import HEAD_BACKLOG

    engine = eagle_engine(llama_pair, eagle_dir, num_kv_blocks=256)
    engine.generate([PROMPTS[0]], SamplingParams(max_tokens=48, ignore_eos=True, num_speculative_tokens=0))
    assert engine.head_use < 0.2
    prompt = engine.tokenizer(PROMPTS[3] + " " + PROMPTS[7]).input_ids
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=HEAD_BACKLOG + 16, ignore_eos=True,
                                                           num_speculative_tokens=0))
    seq = engine.seqs[request_id]
    engine.step()  # the prefill, and the head over the prompt
    assert seq.num_draft_cached == len(prompt) - 1
    while engine.has_unfinished_requests():
        engine.step()
        assert seq.num_draft_cached == len(prompt) - 1
    assert len(seq.eagle_features) > HEAD_BACKLOG
    plain = engine.generate(PROMPTS[4:6], SamplingParams(max_tokens=24, ignore_eos=True, speculative=False))
    drafted = engine.generate(PROMPTS[4:6], SamplingParams(max_tokens=24, ignore_eos=True, num_speculative_tokens=3))
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    assert all(o.stats["by_proposer"]["eagle"]["num_drafted"] > 0 for o in drafted)
    assert engine.kv_usage()["used_blocks"] == 0


def test_the_head_does_not_follow_a_request_without_speculation(llama_pair, eagle_dir):
    """Its features are neither kept nor fed to the head: such a request never drafts."""
    engine = eagle_engine(llama_pair, eagle_dir, num_kv_blocks=128)
    plain = engine.add_request(engine.tokenizer(PROMPTS[3]).input_ids, SamplingParams(
        max_tokens=8, ignore_eos=True, speculative=False))
    lookup = engine.add_request(engine.tokenizer(PROMPTS[4]).input_ids, SamplingParams(
        max_tokens=8, ignore_eos=True, speculative_method="ngram"))
    seqs = [engine.seqs[plain], engine.seqs[lookup]]
    while engine.has_unfinished_requests():
        engine.step()
        assert all(s.num_draft_cached == 0 and s.eagle_features is None for s in seqs)
    assert engine.kv_usage()["used_blocks"] == 0
