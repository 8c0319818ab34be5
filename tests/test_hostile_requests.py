"""A hostile request never changes what its batch mates get (issue 19, items 1 and 3), in the engine.

Each hostile request is added together with a normal one so that both run in the same steps; the normal
one must finish with exactly the tokens it gets alone.
"""

from __future__ import annotations

import pytest

from helix_serve.engine import speculative
from helix_serve.engine.llm_engine import RequestRejectedError
from helix_serve.engine.sampling_params import GREEDY_TEMPERATURE, SamplingParams
from tests.helpers import PROMPTS, make_engine

NORMAL = SamplingParams(max_tokens=16, temperature=0.9, seed=3, ignore_eos=True)
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama_pair):
    return make_engine(llama_pair, num_speculative_tokens=3)


@pytest.fixture(scope="module")
def alone(engine):
    return {name: engine.generate([PROMPTS[0]], params)[0].token_ids
            for name, params in (("normal", NORMAL), ("greedy", GREEDY))}


def run_together(engine, hostile: SamplingParams, prompt: str = PROMPTS[1]):
    """The normal request and the hostile one, admitted together; their final outputs."""
    normal_id = engine.add_request(PROMPTS[0], NORMAL)
    hostile_id = engine.add_request(prompt, hostile)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert engine.kv_usage()["used_blocks"] == 0
    return finals[normal_id], finals[hostile_id]


def test_huge_top_k_keeps_every_token_and_leaves_batch_mates_alone(engine, alone):
    normal, hostile = run_together(engine, SamplingParams(max_tokens=16, top_k=2**63, temperature=0.9, seed=4,
                                                          ignore_eos=True))
    assert normal.token_ids == alone["normal"] and normal.finish_reason == "length"
    assert hostile.finish_reason == "length"  # top_k at or above the vocabulary keeps every token: top_k off
    [off] = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=16, temperature=0.9, seed=4, ignore_eos=True))
    assert hostile.token_ids == off.token_ids


@pytest.mark.parametrize("temperature", [1e-39, 5e-324, GREEDY_TEMPERATURE / 2])
def test_tiny_temperature_is_greedy(engine, alone, temperature):
    normal, tiny = run_together(engine, SamplingParams(max_tokens=16, temperature=temperature, ignore_eos=True),
                                PROMPTS[0])
    assert normal.token_ids == alone["normal"]
    assert tiny.token_ids == alone["greedy"]  # not token V-1 from NaN probabilities
    assert SamplingParams(temperature=temperature).greedy and not SamplingParams(temperature=1e-4).greedy


def test_a_request_whose_step_inputs_fail_fails_alone(engine, alone, monkeypatch):
    """The general rule: whatever goes wrong building one request's part of a step fails that request
    only (here its sampling row raises mid-generation), never the sequences stepping with it."""
    build = speculative._Row.build
    victim = SamplingParams(max_tokens=16, temperature=0.9, seed=77, ignore_eos=True)

    def failing(seq, draft, vocab_size):
        if seq.params is victim and seq.num_output_tokens >= 3:
            raise OverflowError("simulated: this request's settings cannot be built")
        return build(seq, draft, vocab_size)

    monkeypatch.setattr(speculative._Row, "build", failing)
    normal, failed = run_together(engine, victim)
    assert normal.token_ids == alone["normal"] and normal.finish_reason == "length"
    assert failed.finish_reason == "error" and "simulated" in failed.error and len(failed.token_ids) >= 3


def test_settings_a_step_could_not_build_are_refused_at_admission(engine):
    params = SamplingParams(max_tokens=4)
    params.temperature = "hot"  # bypasses __post_init__, as a caller mutating its params could
    with pytest.raises(RequestRejectedError, match="invalid sampling settings"):
        engine.add_request(PROMPTS[0], params)
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=True)
