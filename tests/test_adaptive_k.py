"""Adaptive K: the Leviathan rule, K = 0 when speculation does not pay, probing, load cap."""

import torch

from helix_serve.engine.adaptive_k import AdaptiveK, expected_speedup
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.engine.sequence import Sequence


def _seq() -> Sequence:
    return Sequence("r", [1, 2, 3], SamplingParams(), torch.Generator())


def test_expected_speedup_formula():
    assert expected_speedup(0.0, 0, 0.5) == 1.0
    assert abs(expected_speedup(0.8, 4, 0.1) - (1 - 0.8**5) / (0.2 * 1.4)) < 1e-12
    assert expected_speedup(1.0, 3, 0.0) == 4.0


def test_high_acceptance_and_cheap_draft_choose_large_k():
    policy, seq = AdaptiveK(k_min=0, k_max=8), _seq()
    for _ in range(20):
        policy.update(seq, 8, 8)
    assert policy.alpha(seq) > 0.95
    assert policy.choose(seq, cost_ratio=0.05, num_running=1) == 8


def test_low_acceptance_turns_speculation_off_then_probes():
    policy, seq = AdaptiveK(k_min=0, k_max=8, probe_interval=3), _seq()
    for _ in range(20):
        policy.update(seq, 4, 0)
    assert policy.alpha(seq) < 0.25  # the prior (0.7, weight 4) still pulls a little
    assert policy.choose(seq, cost_ratio=0.3, num_running=1) == 0
    for _ in range(3):
        policy.update(seq, 0, 0)  # plain decoding steps
    assert policy.choose(seq, cost_ratio=0.3, num_running=1) == 1  # probe to re-measure acceptance
    policy.update(seq, 1, 1)
    assert seq.steps_since_speculation == 0


def test_recovers_after_acceptance_improves():
    policy, seq = AdaptiveK(k_min=0, k_max=8), _seq()
    for _ in range(10):
        policy.update(seq, 4, 0)
    low = policy.choose(seq, 0.2, 1)
    for _ in range(30):
        policy.update(seq, 4, 4)
    assert policy.choose(seq, 0.2, 1) > low


def test_load_caps_k_to_the_token_budget():
    policy, seq = AdaptiveK(k_min=0, k_max=8, max_num_batched_tokens=64), _seq()
    for _ in range(20):
        policy.update(seq, 8, 8)
    assert policy.choose(seq, 0.05, num_running=1) == 8
    assert policy.choose(seq, 0.05, num_running=16) == 3  # 16 sequences x (3 + 1) = 64 tokens
    assert policy.choose(seq, 0.05, num_running=64) == 0


def test_verify_cost_makes_speculation_more_conservative():
    policy, seq = AdaptiveK(k_min=0, k_max=8), _seq()
    for _ in range(20):
        policy.update(seq, 4, 2)  # α ≈ 0.67
    leviathan = policy.choose(seq, 0.3, 1)
    with_verify = policy.choose(seq, 0.3, 1, verify_ratio=0.1)
    assert expected_speedup(0.67, 2, 0.3, 0.1) < expected_speedup(0.67, 2, 0.3)
    assert with_verify <= leviathan and leviathan >= 1
