"""Logprobs, penalties, logit bias and min-p under speculation (issue 16), on the embedded toy pair.

Logprobs must be the target's own (transformers' log_softmax of its logits) at every emitted position;
penalties must act on draft and target alike with each position's own history, so greedy equals
transformers' generate and sampling has exactly the target-only distribution.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

from helix_serve.config import TOY_DRAFT, TOY_TARGET, EngineConfig
from helix_serve.engine.llm_engine import LLMEngine, RequestRejectedError
from helix_serve.engine.sampling_params import SamplingParams

PROMPTS = ["ROMEO:\nBut soft, what light", "First Citizen:\nBefore we proceed", "Enter HAMLET.\n\nHAMLET:\n"]
PENALTIES = dict(presence_penalty=1.5, frequency_penalty=0.5, min_p=0.1)  # the statistical test's settings
NUM_DRAWS = 2000  # per sampling mode
P_VALUE_FLOOR = 1e-3  # chi-square goodness of fit: an exact sampler fails this one time in a thousand


def toy_engine(draft: str = TOY_DRAFT, **overrides) -> LLMEngine:
    # Configured step costs: planned K must draft here (the tests check drafted positions), whatever the timing
    # of a 5.8M-parameter model on a busy machine would make the planner choose.
    settings = dict(device="cpu", dtype="float32", max_num_seqs=256, num_kv_blocks=2048, draft_cost_ratio=0.1,
                    verify_cost_ratio=0.02)
    return LLMEngine(EngineConfig(TOY_TARGET, draft, **{**settings, **overrides}))


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return toy_engine()


def target_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """transformers' fp32 logits of the target for every position of `token_ids`: [T, V]."""
    with torch.no_grad():
        return engine.pair.target.hf_model(torch.tensor([token_ids], device=engine.device)).logits[0].float().cpu()


@pytest.mark.parametrize("settings", [dict(temperature=1.0, seed=3), dict(temperature=0.8, top_k=40),
                                      dict(temperature=0.0, repetition_penalty=1.2)])
def test_logprobs_are_the_targets_log_softmax_at_every_emitted_position(engine, settings):
    params = SamplingParams(max_tokens=32, ignore_eos=True, num_speculative_tokens=4, logprobs=5, **settings)
    outputs = engine.generate(PROMPTS, params)
    assert sum(o.stats["num_accepted"] for o in outputs) > 0  # accepted drafts are among the positions checked
    for prompt, out in zip(PROMPTS, outputs):
        prompt_ids = engine.tokenizer(prompt).input_ids
        expected = target_logits(engine, prompt_ids + out.token_ids)[len(prompt_ids) - 1 : -1].log_softmax(-1)
        assert [lp.token_id for lp in out.logprobs] == out.token_ids
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        torch.testing.assert_close(got, expected.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1),
                                   atol=1e-4, rtol=0)
        top_values, top_ids = expected.topk(5, dim=-1)
        torch.testing.assert_close(torch.tensor([[v for _, v in lp.top] for lp in out.logprobs]), top_values,
                                   atol=1e-4, rtol=0)
        assert [[i for i, _ in lp.top] for lp in out.logprobs] == top_ids.tolist()


def test_streamed_logprobs_match_the_final_ones_and_stop_with_the_tokens(engine):
    params = SamplingParams(max_tokens=20, ignore_eos=True, num_speculative_tokens=3, logprobs=0, temperature=0.7,
                            seed=11)
    request_id = engine.add_request(PROMPTS[0], params)
    streamed, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert len(out.new_logprobs) == len(out.new_token_ids)
            streamed.extend(out.new_logprobs)
            final = out if out.finished else final
    assert final.request_id == request_id and len(streamed) == 20
    assert final.logprobs is None  # the engine keeps none: the stream's reader does (generate, the ingress)
    assert all(lp.top == [] for lp in streamed)  # logprobs=0: the sampled token's only
    [again] = engine.generate([PROMPTS[0]], params)
    assert again.logprobs == streamed
    [plain] = engine.generate([PROMPTS[0]], replace(params, logprobs=None))
    assert plain.logprobs is None and plain.token_ids == final.token_ids  # asking changes no token


def hf_generate(engine: LLMEngine, prompt: str, max_new_tokens: int, **processing) -> list[int]:
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = engine.pair.target.hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                   max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                                   pad_token_id=0, **processing)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("k", [0, 3, None])
def test_greedy_with_repetition_penalty_equals_transformers_generate(engine, k):
    reference = [hf_generate(engine, p, 40, repetition_penalty=1.3) for p in PROMPTS]
    assert reference != [hf_generate(engine, p, 40) for p in PROMPTS]  # the penalty changes the output
    params = SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=1.3, num_speculative_tokens=k)
    outputs = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in outputs] == reference
    if k != 0:
        assert sum(o.stats["num_accepted"] for o in outputs) > 0
    [plain] = engine.generate(PROMPTS[:1], replace(params, speculative=False))
    assert plain.token_ids == reference[0]


def test_penalties_bias_and_min_p_act_identically_on_draft_and_target():
    """With the target as its own draft, p and q agree at every position only if both see the same
    penalty state (the step's earlier drafts included): then every draft is accepted."""
    same = toy_engine(draft=TOY_TARGET)
    bias = {int(same.tokenizer(" the").input_ids[0]): 3.0, 5: -100.0}
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.9, num_speculative_tokens=4,
                            repetition_penalty=1.2, logit_bias=bias, **PENALTIES)
    outputs = same.generate(PROMPTS, params)
    drafted, accepted = (sum(o.stats[key] for o in outputs) for key in ("num_drafted", "num_accepted"))
    assert drafted > 50 and accepted / drafted > 0.99


def test_logit_bias_bans_and_forces_tokens(engine):
    [free] = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=12, ignore_eos=True, num_speculative_tokens=3))
    banned = free.token_ids[0]
    params = SamplingParams(max_tokens=12, ignore_eos=True, num_speculative_tokens=3, logit_bias={banned: -100.0})
    [without] = engine.generate(PROMPTS[:1], params)
    assert banned not in without.token_ids
    [forced] = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0,
                                                           num_speculative_tokens=3, logit_bias={42: 100.0}))
    assert forced.token_ids == [42] * 12 and forced.stats["num_accepted"] > 0


def reference_probs(engine: LLMEngine, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Target-only sampling with PENALTIES at temperature 1, written out from the definitions: [V]."""
    logits = target_logits(engine, prompt_ids + output_ids)[-1]
    counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=logits.numel()).float()
    logits = logits - PENALTIES["frequency_penalty"] * counts - PENALTIES["presence_penalty"] * (counts > 0).float()
    probs = logits.softmax(-1)
    probs = torch.where(probs < PENALTIES["min_p"] * probs.max(), 0.0, probs)
    return probs / probs.sum()


def exact_distribution(engine: LLMEngine, prompt_ids: list[int], depth: int) -> dict[tuple[int, ...], float]:
    """P(first `depth` output tokens) under target-only sampling, by enumerating min-p's small support."""
    exact: dict[tuple[int, ...], float] = {}

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == depth:
            exact[tuple(prefix)] = prob
            return
        probs = reference_probs(engine, prompt_ids, prefix)
        for token in probs.nonzero().flatten().tolist():
            walk(prefix + [token], prob * float(probs[token]))

    walk([], 1.0)
    return exact


def chi_square_p_value(counts: Counter, exact: dict[tuple[int, ...], float], num_draws: int) -> float:
    """Goodness of fit; outcomes expected fewer than 5 times are pooled into one cell."""
    observed, expected, pooled_observed, pooled_expected = [], [], 0, 0.0
    for outcome, prob in exact.items():
        if prob * num_draws >= 5:
            observed.append(counts[outcome])
            expected.append(prob * num_draws)
        else:
            pooled_observed += counts[outcome]
            pooled_expected += prob * num_draws
    observed.append(pooled_observed + sum(n for o, n in counts.items() if o not in exact))  # impossible ones
    expected.append(pooled_expected)
    obs, exp = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    statistic = float(((obs - exp) ** 2 / exp).sum())
    dof = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.mark.parametrize("mode", ["target_only", "speculative", "speculative_seeded", "prompt_lookup"])
def test_sampling_with_penalties_and_min_p_has_the_target_only_distribution(engine, mode):
    """The first three output tokens: the first from the prefill, the next two from a K = 3 step (accepted
    drafts, whose penalty state includes the drafts before them, or recovered/bonus/judged tokens).
    prompt_lookup: the drafts are one-hot proposals copied from the prompt (which repeats itself)."""
    prompt_ids = engine.tokenizer(PROMPTS[0]).input_ids
    if mode == "prompt_lookup":
        prompt_ids = prompt_ids * 3
    exact = exact_distribution(engine, prompt_ids, 3)
    method = "ngram" if mode == "prompt_lookup" else "draft"
    params = [SamplingParams(max_tokens=5, ignore_eos=True, temperature=1.0, speculative=mode != "target_only",
                             num_speculative_tokens=3, seed=i if mode == "speculative_seeded" else None,
                             speculative_method=method, **PENALTIES)
              for i in range(NUM_DRAWS)]
    outputs = engine.generate([prompt_ids] * NUM_DRAWS, params)
    if mode == "prompt_lookup":  # proposals were made and judged, some accepted and some not
        counts = [o.stats["by_proposer"].get("ngram", {}) for o in outputs]
        drafted, accepted = (sum(c.get(key, 0) for c in counts) for key in ("num_drafted", "num_accepted"))
        assert drafted >= NUM_DRAWS and 0 < accepted < drafted
    elif mode != "target_only":
        assert sum(o.stats["num_accepted"] for o in outputs) > NUM_DRAWS  # most second tokens were drafts
    counts = Counter(tuple(o.token_ids[:3]) for o in outputs)
    assert chi_square_p_value(counts, exact, NUM_DRAWS) > P_VALUE_FLOOR


def test_bad_settings_are_refused(engine):
    for bad in (dict(repetition_penalty=0.0), dict(presence_penalty=2.5), dict(frequency_penalty=-3.0),
                dict(min_p=1.5), dict(logit_bias={-1: 1.0}), dict(logit_bias={3: 101.0}), dict(logprobs=21)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(RequestRejectedError, match="logit_bias"):
        engine.add_request(PROMPTS[0], SamplingParams(logit_bias={10**6: 1.0}))
