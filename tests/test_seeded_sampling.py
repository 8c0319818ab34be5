"""Seeded sampling is reproducible whatever K, batch mates or preemption (issue 19, item 7).

A request's uniforms are indexed by output position, and a seeded request with speculation on makes
every token by the same rule at every K (speculative.py), so its tokens are a function of the prompt,
the settings and the seed alone.
"""

from __future__ import annotations

import pytest

from helix_serve.engine.sampler import Purpose, position_uniform
from helix_serve.engine.sampling_params import SamplingParams
from tests.helpers import PROMPTS, make_engine

MAX_TOKENS = 24
PROMPT = PROMPTS[1]


def seeded(**overrides) -> SamplingParams:
    settings = dict(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.95, seed=123, ignore_eos=True)
    return SamplingParams(**{**settings, **overrides})


@pytest.fixture(scope="module")
def engine(llama_pair):
    return make_engine(llama_pair)  # adaptive K


@pytest.fixture(scope="module")
def reference(engine):
    [out] = engine.generate([PROMPT], seeded(num_speculative_tokens=0))
    return out.token_ids


@pytest.mark.parametrize("k", [1, 4, None])  # None: adaptive
def test_same_seed_same_tokens_whatever_k(engine, reference, k):
    [out] = engine.generate([PROMPT], seeded(num_speculative_tokens=k))
    assert out.token_ids == reference
    if k:
        assert out.stats["num_drafted"] > 0  # it did speculate
    assert engine.kv_usage()["used_blocks"] == 0


def test_other_settings_are_k_independent_too(engine):
    params = dict(temperature=0.7, top_k=20, top_p=1.0, seed=9)
    [k0] = engine.generate([PROMPTS[3]], seeded(num_speculative_tokens=0, **params))
    [k3] = engine.generate([PROMPTS[3]], seeded(num_speculative_tokens=3, **params))
    [other_seed] = engine.generate([PROMPTS[3]], seeded(num_speculative_tokens=3, **{**params, "seed": 10}))
    assert k0.token_ids == k3.token_ids and other_seed.token_ids != k3.token_ids


def test_batch_mates_and_preemption_do_not_change_a_seeded_request(llama_pair, reference):
    small = make_engine(llama_pair, num_kv_blocks=20)  # 80 token slots: three requests cannot all fit
    mates = [PROMPTS[0], PROMPTS[4]]
    mate_params = [SamplingParams(max_tokens=30, ignore_eos=True, num_speculative_tokens=2),
                   seeded(seed=5, max_tokens=30, num_speculative_tokens=3)]
    outputs = small.generate(mates + [PROMPT], mate_params + [seeded(num_speculative_tokens=4)])
    ours = outputs[-1]
    assert ours.stats["num_preemptions"] > 0  # it was the newest, so the one preempted
    assert ours.token_ids == reference
    [alone] = small.generate([PROMPT], seeded(num_speculative_tokens=4))
    assert alone.token_ids == reference
    assert small.kv_usage()["used_blocks"] == 0


def test_explicit_preemption_mid_generation(engine, reference):
    request_id = engine.add_request(PROMPT, seeded(num_speculative_tokens=4))
    seq = engine.seqs[request_id]
    finals = []
    for step in range(40):
        if step in (3, 6):
            engine.scheduler.preempt(seq)  # recompute from its tokens, as when the pool runs short
        finals += [o for o in engine.step() if o.finished]
        if finals:
            break
    assert finals[0].token_ids == reference and finals[0].stats["num_preemptions"] == 2


def test_plain_decoding_is_reproducible_under_preemption(llama_pair):
    small = make_engine(llama_pair, num_kv_blocks=20)
    plain = seeded(speculative=False)
    [alone] = small.generate([PROMPT], plain)
    outputs = small.generate([PROMPTS[0], PROMPTS[4], PROMPT],
                             [SamplingParams(max_tokens=30, ignore_eos=True)] * 2 + [plain])
    assert outputs[-1].stats["num_preemptions"] > 0 and outputs[-1].token_ids == alone.token_ids


def test_position_uniforms_are_fixed_by_seed_position_and_purpose():
    u = position_uniform(123, 40, Purpose.FINAL)
    assert u == position_uniform(123, 40, Purpose.FINAL) and 0.0 < u <= 1.0
    others = {position_uniform(123, 41, Purpose.FINAL), position_uniform(124, 40, Purpose.FINAL),
              position_uniform(123, 40, Purpose.ACCEPT), position_uniform(123, 40, Purpose.DRAFT)}
    assert u not in others and len(others) == 4
    assert 0.0 < position_uniform(2**80, 0, Purpose.DRAFT) <= 1.0  # any integer seed
    draws = [position_uniform(7, i, Purpose.DRAFT) for i in range(20_000)]
    assert abs(sum(draws) / len(draws) - 0.5) < 0.01  # uniform on (0, 1]
