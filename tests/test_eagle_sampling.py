"""Sampling with the `eagle` proposer: tokens distributed as the target's, and the request's logits processing
(penalties, logit_bias, top-k) applied to the head's q as to the target's p."""

from __future__ import annotations

import torch

from helix_serve.engine.sampling_params import SamplingParams
from tests.test_eagle_engine import eagle_engine

PROMPT = "the quick brown"
TOP_K = 4  # the first two tokens then have 16 possible pairs, whose exact probabilities the target gives
# On two tokens of the head's sub-vocabulary (even ids), for p and q alike: the random head's top-k would miss
# the target's and never be accepted; this way some drafts are accepted and some rejected.
BIAS = {6: 2.0, 8: 2.0}
NUM_REQUESTS = 4000  # TV distance of an exact sampler over 16 outcomes is ~0.025 at this size (fixed seeds)
TV_BOUND = 0.05


def _top_k_probs(engine, ids: list[int]) -> dict[int, float]:
    """The target's next-token distribution after `ids` at T = 1 with BIAS and top-k, from transformers directly."""
    with torch.no_grad():
        logits = engine.pair.target.hf_model(torch.tensor([ids], device=engine.device)).logits[0, -1].float().cpu()
    logits[list(BIAS)] += torch.tensor(list(BIAS.values()))
    values, tokens = logits.topk(TOP_K)
    return dict(zip(tokens.tolist(), torch.softmax(values, -1).tolist()))


def test_sampled_tokens_with_eagle_drafts_are_distributed_as_the_target(llama_pair, eagle_dir):
    engine = eagle_engine(llama_pair, eagle_dir, max_num_seqs=64)
    prompt = engine.tokenizer(PROMPT).input_ids
    first = _top_k_probs(engine, prompt)
    exact = {(a, b): pa * pb for a, pa in first.items() for b, pb in _top_k_probs(engine, prompt + [a]).items()}
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=TOP_K, seed=i, ignore_eos=True,
                             logit_bias=BIAS, num_speculative_tokens=2) for i in range(NUM_REQUESTS)]
    outs = engine.generate([prompt] * NUM_REQUESTS, params)
    pairs = [tuple(o.token_ids[:2]) for o in outs]
    tv = 0.5 * sum(abs(pairs.count(pair) / NUM_REQUESTS - p) for pair, p in exact.items())
    assert set(pairs) <= set(exact) and tv < TV_BOUND
    drafted = sum(o.stats["by_proposer"]["eagle"]["num_drafted"] for o in outs)
    accepted = sum(o.stats["by_proposer"]["eagle"]["num_accepted"] for o in outs)
    # max_tokens 3 leaves room for one draft: the second token is the head's accepted draft or a residual draw
    assert drafted == NUM_REQUESTS and 0 < accepted < drafted


def test_penalties_and_logit_bias_apply_to_the_heads_q(llama_pair, eagle_dir):
    """Greedy with a repetition penalty and a logit_bias is target-only greedy with the same settings; a bias
    that forces a token the head can propose is accepted at every position only if q carries it too."""
    engine = eagle_engine(llama_pair, eagle_dir)
    prompts = ["the quick brown", "speculative decoding drafts tokens and the target"]
    for bias in ({6: 3.0, 11: -4.0}, {6: 100.0}):  # 6: even, so in the head's sub-vocabulary
        settings = dict(max_tokens=16, ignore_eos=True, repetition_penalty=1.3, logit_bias=bias)
        spec = engine.generate(prompts, SamplingParams(num_speculative_tokens=3, **settings))
        plain = engine.generate(prompts, SamplingParams(speculative=False, **settings))
        assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    unbiased = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, speculative=False))
    assert all(o.token_ids != u.token_ids for o, u in zip(plain, unbiased))
    assert all(set(o.token_ids) == {6} for o in spec)
    assert all(o.stats["num_accepted"] == o.stats["num_drafted"] > 0 for o in spec)

