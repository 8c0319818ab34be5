"""Stops, streaming deltas, abort, error and deadline paths: nothing leaks into the output, no block leaks."""

import time

import pytest
import torch

from helix_serve.engine.llm_engine import RequestRejectedError
from helix_serve.engine.sampling_params import SamplingParams
from tests.helpers import PROMPTS, make_engine

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def engine(llama_pair):
    return make_engine(llama_pair, num_speculative_tokens=4)


@pytest.fixture(scope="module")
def greedy(engine):
    [out] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    return out


def _stream(engine, prompt, params):
    request_id = engine.add_request(prompt, params)
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [o for o in engine.step() if o.request_id == request_id]
    return deltas


def test_stop_string_cuts_text_and_tokens(engine, greedy):
    text = greedy.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    deltas = _stream(engine, PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=[stop]))
    final = deltas[-1]
    assert final.finish_reason == "stop"
    assert final.text == text[: text.find(stop)]
    assert "".join(d.new_text for d in deltas) == final.text  # the stop string never streamed out
    assert final.token_ids == greedy.token_ids[: len(final.token_ids)]
    assert final.stats["tokens_generated"] == len(final.token_ids)
    decoded = engine.tokenizer.decode(final.token_ids[:-1], skip_special_tokens=True)
    assert stop not in decoded  # the token that completed the stop is the last one kept
    assert engine.kv_usage()["used_blocks"] == 0


def test_stop_token_and_eos_end_inside_an_accepted_run(engine, greedy):
    target = greedy.token_ids[6]
    first = greedy.token_ids.index(target)
    [out] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=[target]))
    assert out.token_ids == greedy.token_ids[: first + 1] and out.finish_reason == "stop"
    saved = engine.stop_checker.eos_token_ids
    engine.stop_checker.eos_token_ids = {target}
    try:
        [eos] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS))
        [ignored] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    finally:
        engine.stop_checker.eos_token_ids = saved
    assert eos.token_ids == out.token_ids and eos.finish_reason == "stop"
    assert ignored.token_ids == greedy.token_ids


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_max_tokens_is_never_exceeded(engine, greedy, max_tokens):
    deltas = _stream(engine, PROMPTS[0], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    final = deltas[-1]
    assert final.token_ids == greedy.token_ids[:max_tokens] and final.finish_reason == "length"
    assert sum(len(d.new_token_ids) for d in deltas) == max_tokens
    assert "".join(d.new_text for d in deltas) == final.text


def test_abort_frees_blocks_and_leaves_others_untouched(engine, greedy):
    victim = engine.add_request(PROMPTS[3], SamplingParams(max_tokens=200, ignore_eos=True))
    keeper = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    engine.step()
    engine.step()
    usage = engine.kv_usage()
    assert usage["used_blocks"] > 0 and usage["num_running"] == 2
    assert 0 < usage["live_tokens"] * usage["bytes_per_token"] <= usage["reserved_bytes"]
    assert engine.abort_request(victim) and not engine.abort_request(victim)
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finals] == [keeper] and finals[0].token_ids == greedy.token_ids
    assert engine.kv_usage()["used_blocks"] == 0


def test_failed_step_fails_its_requests_and_frees_blocks(engine, greedy, monkeypatch):
    engine.add_request(PROMPTS[1], SamplingParams(max_tokens=MAX_TOKENS))
    engine.step()

    def boom(seqs, ks):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine.decoder, "step", boom)
    [out] = engine.step()
    assert out.finished and out.finish_reason == "error" and "simulated device failure" in out.error
    assert engine.kv_usage()["used_blocks"] == 0 and not engine.has_unfinished_requests()
    monkeypatch.undo()
    [again] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert again.token_ids == greedy.token_ids


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(engine):
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in (7, 7, 8)]
    a, b, c = engine.generate([PROMPTS[2]] * 3, params)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stats_are_consistent(engine):
    [out] = engine.generate([PROMPTS[4]], SamplingParams(max_tokens=20, ignore_eos=True))
    s = out.stats
    assert s["tokens_generated"] == 20 and 0 < s["time_to_first_token"] <= s["time_seconds"]
    assert s["num_accepted"] <= s["num_judged"] <= s["num_drafted"] and s["mean_accepted_length"] >= 1.0
    assert s["acceptance_rate"] <= s["alpha"] <= 1.0  # α ignores drafts after the first rejection
    assert s["per_position_acceptance"] and all(0 <= a <= 1 for a in s["per_position_acceptance"])


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", SamplingParams(), "empty"),
        ("the " * 600, SamplingParams(), "context"),
        ("the quick", SamplingParams(num_speculative_tokens=99), "num_speculative_tokens"),
    ],
)
def test_requests_that_can_never_run_are_rejected_clearly(engine, prompt, params, message):
    with pytest.raises(RequestRejectedError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished_requests()


def test_request_larger_than_the_whole_pool_is_rejected(llama_pair):
    small = make_engine(llama_pair, num_kv_blocks=8)  # 32 tokens in all
    with pytest.raises(RequestRejectedError, match="can never fit the KV pool"):
        small.add_request("the quick", SamplingParams(max_tokens=40))
    [out] = small.generate(["the quick"], SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(out.token_ids) == 8 and small.kv_usage()["used_blocks"] == 0


def test_deadline_ends_generation_and_frees_blocks(engine, greedy):
    slow = engine.add_request(PROMPTS[3], SamplingParams(max_tokens=200, ignore_eos=True, timeout_s=0.05))
    fast = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    engine.step()
    time.sleep(0.06)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert finals[slow].finish_reason == "timeout" and len(finals[slow].token_ids) < 200
    assert finals[fast].token_ids == greedy.token_ids
    assert engine.kv_usage()["used_blocks"] == 0


def test_device_oom_mid_step_preempts_and_every_request_finishes_correctly(llama_pair, monkeypatch):
    engine = make_engine(llama_pair, num_speculative_tokens=3, max_num_seqs=8)
    reference = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    target = engine.decoder.target
    real_logits, calls = target.logits, {"n": 0}

    def flaky_logits(tables, chunks, starts, num_logits):
        calls["n"] += 1
        if calls["n"] in (3, 4, 9) and len(chunks) > 1:  # big batches fail, as a real device would
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_logits(tables, chunks, starts, num_logits)

    monkeypatch.setattr(target, "logits", flaky_logits)
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outputs] == [r.token_ids for r in reference]
    assert sum(o.stats["num_preemptions"] for o in outputs) > 0
    assert engine.kv_usage()["used_blocks"] == 0


def test_oom_on_a_lone_sequence_fails_it_clearly(engine, monkeypatch):
    def always_oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine.decoder.target, "logits", always_oom)
    [out] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8))
    assert out.finish_reason == "error" and out.error.startswith("out of memory")
    assert engine.kv_usage()["used_blocks"] == 0


def test_start_up_calibration_measures_cost_curves(engine):
    costs = engine.step_costs
    target, draft = costs.target, costs.draft
    assert costs.live and target.token_sizes[:5] == [1, 2, 3, 4, 5] and draft.token_sizes[:5] == [1, 2, 3, 4, 5]
    assert target.row_sizes[:3] == [1, 2, 4] and target.base_context > 0
    # both measured past 64 tokens: long draft catch-ups and the target's wide verify passes under load (32 rows ×
    # K + 1) are timed, not extended from narrower points
    assert draft.token_sizes[-1] == target.token_sizes[-1] > 64
    assert target(64) > target(1) > 0 and draft(1) > 0
    c, v = engine.cost_ratios
    assert c == draft(1) / target(1) and v == (target(5) - target(1)) / 4 / target(1)
    assert engine.kv_usage()["used_blocks"] == 0  # the scratch sequence gave its blocks back
