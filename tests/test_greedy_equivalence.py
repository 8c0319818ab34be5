"""Greedy speculative output is token-identical to the target alone (transformers' greedy, fp32)."""

import pytest

from helix_serve.engine.llm_engine import RequestRejectedError
from helix_serve.engine.sampling_params import SamplingParams
from tests.helpers import PROMPTS, hf_greedy, make_engine

MAX_TOKENS = 24


@pytest.fixture(scope="module", params=["llama_pair", "qwen2_pair"])
def engine_and_reference(request):
    engine = make_engine(request.getfixturevalue(request.param))
    reference = [hf_greedy(engine, p, MAX_TOKENS) for p in PROMPTS]
    return engine, reference


@pytest.mark.parametrize("k", [0, 1, 3, 5, None])
def test_ragged_batch_of_8_matches_target_greedy(engine_and_reference, k):
    engine, reference = engine_and_reference
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, num_speculative_tokens=k)
    outputs = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in outputs] == reference
    assert all(o.finish_reason == "length" for o in outputs)
    if k:
        assert sum(o.stats["num_drafted"] for o in outputs) > 0
    assert engine.kv_usage()["used_blocks"] == 0


@pytest.mark.parametrize("k", [2, 4])
def test_batch_of_one_matches_target_greedy(engine_and_reference, k):
    engine, reference = engine_and_reference
    for prompt, expected in zip(PROMPTS[:3], reference[:3]):
        [out] = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True,
                                                         num_speculative_tokens=k))
        assert out.token_ids == expected


def test_speculation_off_per_request(engine_and_reference):
    engine, reference = engine_and_reference
    [out] = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, speculative=False))
    assert out.token_ids == reference[1]
    assert out.stats["num_drafted"] == 0 and out.stats["mean_accepted_length"] == 1.0


def test_tiny_pool_preempts_and_recomputes_without_changing_output(llama_pair):
    # 20 blocks of 4 tokens cannot hold 8 sequences of up to ~76 tokens at once: preemption must kick in.
    engine = make_engine(llama_pair, num_kv_blocks=20, num_speculative_tokens=3)
    reference = [hf_greedy(engine, p, MAX_TOKENS) for p in PROMPTS]
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outputs] == reference
    assert sum(o.stats["num_preemptions"] for o in outputs) > 0
    assert engine.kv_usage()["used_blocks"] == 0


@pytest.mark.parametrize("method", ["ngram", "hybrid"])
@pytest.mark.parametrize("k", [3, None])
def test_prompt_lookup_and_hybrid_match_target_greedy(engine_and_reference, method, k):
    """Ragged batch on 4-token blocks; the prompts repeat phrases, so prompt lookup has something to propose."""
    engine, reference = engine_and_reference
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, num_speculative_tokens=k, speculative_method=method)
    outputs = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in outputs] == reference
    by_proposer = [o.stats["by_proposer"] for o in outputs]
    assert sum(b.get("ngram", {}).get("num_drafted", 0) for b in by_proposer) > 0
    if method == "ngram":
        assert all("draft" not in b for b in by_proposer)
    assert engine.kv_usage()["used_blocks"] == 0


def test_hybrid_under_preemption_matches_target_greedy(llama_pair):
    engine = make_engine(llama_pair, num_kv_blocks=20, speculative_method="hybrid", num_speculative_tokens=3)
    reference = [hf_greedy(engine, p, MAX_TOKENS) for p in PROMPTS]
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outputs] == reference
    assert sum(o.stats["num_preemptions"] for o in outputs) > 0
    assert engine.kv_usage()["used_blocks"] == 0


def test_an_engine_without_a_draft_model_speculates_by_prompt_lookup(llama_pair):
    engine = make_engine(llama_pair, draft_model=None)
    assert engine.method == "ngram"
    reference = [hf_greedy(engine, p, MAX_TOKENS) for p in PROMPTS]
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, num_speculative_tokens=4))
    assert [o.token_ids for o in outputs] == reference
    assert sum(o.stats["by_proposer"].get("ngram", {}).get("num_accepted", 0) for o in outputs) > 0
    with pytest.raises(RequestRejectedError, match="needs a draft model"):
        engine.add_request("x", SamplingParams(speculative_method="draft"))


def test_a_batch_mixing_methods_per_request_matches_target_greedy(engine_and_reference):
    engine, reference = engine_and_reference
    settings = [dict(speculative_method="draft"), dict(speculative_method="ngram"), dict(speculative_method="hybrid"),
                dict(speculative=False), dict(speculative_method="ngram", num_speculative_tokens=2),
                dict(speculative_method="draft", num_speculative_tokens=5), dict(), dict(speculative_method="hybrid")]
    params = [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **s) for s in settings]
    outputs = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in outputs] == reference
    assert "ngram" not in outputs[0].stats["by_proposer"] and "draft" not in outputs[1].stats["by_proposer"]
    assert outputs[3].stats["num_drafted"] == 0
    assert engine.kv_usage()["used_blocks"] == 0
