"""The rejection sampler reproduces the target distribution exactly (statistical, fixed seed)."""

import torch

from helix_serve.engine import sampler
from helix_serve.engine.rejection import greedy_verify, rejection_sample
from helix_serve.engine.sampler import SamplingTensors, argmax, logits_to_probs, sample_from_probs
from helix_serve.engine.sampling_params import SamplingParams

N = 200_000  # draws; the TV distance of an exact sampler over 8 outcomes is ~0.003 at this size
TV_BOUND = 0.01


def _tv(samples: torch.Tensor, probs: torch.Tensor) -> float:
    empirical = torch.bincount(samples, minlength=probs.numel()).float() / samples.numel()
    return 0.5 * float((empirical - probs).abs().sum())


def _run(p: torch.Tensor, q: torch.Tensor, k: int, gen: torch.Generator, judge_last: bool = False):
    """Draft k tokens i.i.d. from fixed q_i, judge them against fixed p_i (p has k+1 rows). With judge_last
    the draft proposes k+1 tokens (q has k+1 rows) and the last is judged against p_{k+1} too."""
    width = k + judge_last
    draft_probs = q.expand(N, width, -1)
    draft_ids = torch.stack([sample_from_probs(draft_probs[:, i], 1 - torch.rand(N, generator=gen))
                             for i in range(width)], 1) if width else torch.zeros(N, 0, dtype=torch.long)
    return rejection_sample(draft_ids, draft_probs, p.expand(N, k + 1, -1), torch.full((N,), k),
                            1 - torch.rand(N, width, generator=gen), 1 - torch.rand(N, k + 1, generator=gen),
                            torch.full((N,), judge_last)), draft_ids


def _first_token(result, draft_ids):
    return torch.where(result.num_accepted > 0, draft_ids[:, 0], result.next_token_ids)


def test_first_token_follows_target_distribution():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.30, 0.05, 0.20, 0.0, 0.15, 0.10, 0.15, 0.05])
    q = torch.tensor([0.05, 0.40, 0.10, 0.10, 0.05, 0.20, 0.05, 0.05])
    result, draft_ids = _run(p.expand(2, -1), q.expand(1, -1), 1, gen)
    assert _tv(_first_token(result, draft_ids), p) < TV_BOUND
    expected_alpha = float(torch.minimum(p, q).sum())  # the standard acceptance rate
    assert abs(result.num_accepted.float().mean().item() - expected_alpha) < 0.01


def test_second_position_after_acceptance_follows_its_target_distribution():
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0], [0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.1, 0.1],
                      [0.125] * 8])
    q = torch.tensor([[0.3, 0.3, 0.3, 0.1, 0, 0, 0, 0], [0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]])
    result, draft_ids = _run(p, q, 2, gen)
    kept = result.num_accepted >= 1
    second = torch.where(result.num_accepted[kept] >= 2, draft_ids[kept, 1], result.next_token_ids[kept])
    assert _tv(second, p[1]) < TV_BOUND
    bonus = result.next_token_ids[result.num_accepted == 2]  # all accepted: bonus token from p_{k+1}
    assert _tv(bonus, p[2]) < 0.02


def test_top_k_top_p_applied_identically_to_draft_and_target():
    gen = torch.Generator().manual_seed(2)
    target_logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    draft_logits = torch.tensor([[0.0, 2.0, 1.8, 0.2, 1.0, -0.5, 0.3, -2.0]])
    settings = SamplingTensors.from_params([SamplingParams(temperature=0.8, top_k=5, top_p=0.9)], torch.device("cpu"), 8)
    p, q = logits_to_probs(target_logits, settings), logits_to_probs(draft_logits, settings)
    assert int((p > 0).sum()) <= 5 and int((q > 0).sum()) <= 5
    result, draft_ids = _run(p.expand(2, -1), q, 1, gen)
    first = _first_token(result, draft_ids)
    assert _tv(first, p[0]) < TV_BOUND
    assert bool((p[0][first] > 0).all())  # never a token outside the target's top-k/top-p set


def test_top_k_top_p_sorts_only_the_candidates_when_they_hold_every_kept_token(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    vocab = 4 * sampler.TOP_CANDIDATES
    logits = torch.randn(5, vocab, generator=gen) * torch.tensor([[0.2], [3.0], [3.0], [6.0], [6.0]])
    top_k, top_p = torch.tensor([0, 0, 50, 2000, 0]), torch.tensor([0.9, 0.9, 0.95, 0.8, 0.5])
    sorted_first = sampler._top_k_top_p(logits, top_k, top_p)  # row 0 is flat: its nucleus needs the full sort
    monkeypatch.setattr(sampler, "TOP_CANDIDATES", vocab)
    assert torch.equal(sorted_first, sampler._top_k_top_p(logits, top_k, top_p))
    assert torch.equal(sampler._top_k_top_p(logits[1:], top_k[1:], top_p[1:]), sorted_first[1:])
    assert 0 < int(torch.isfinite(sorted_first[1:]).sum(-1).max()) <= sampler.TOP_CANDIDATES


def test_identical_draft_and_target_accepts_everything():
    gen = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(8, generator=gen), 0)
    result, draft_ids = _run(p.expand(4, -1), p.expand(3, -1), 3, gen)
    assert bool((result.num_accepted == 3).all())
    assert _tv(draft_ids[:, 0], p) < TV_BOUND and _tv(result.next_token_ids, p) < TV_BOUND


def test_greedy_rows_accept_only_the_target_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    greedy = SamplingTensors.from_params([SamplingParams(), SamplingParams()], torch.device("cpu"), 3)
    p = logits_to_probs(logits, greedy)
    assert p.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    q = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])  # row 0 drafts the argmax, row 1 does not
    result = rejection_sample(torch.tensor([[1], [2]]), q, torch.stack([p, p], 1), torch.tensor([1, 1]),
                              torch.rand(2, 1), torch.rand(2))
    assert result.num_accepted.tolist() == [1, 0]
    assert result.next_token_ids.tolist() == [1, 0]  # bonus = argmax; recovered = target argmax


def test_argmax_is_torchs_first_maximum_in_every_layout():
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 3, 7, 12):  # the weight-major layout is read in place up to 8 rows, copied above
        logits = torch.randint(0, 4, (rows, 300), generator=gen).float()  # ties everywhere
        for layout in (logits, logits.t().contiguous().t(), torch.stack((logits, logits), -1)[..., 0]):
            assert torch.equal(argmax(layout), logits.argmax(dim=-1))


def test_greedy_verify_is_rejection_sampling_with_one_hot_distributions():
    gen = torch.Generator().manual_seed(5)
    vocab, rows, width = 4, 400, 3
    target_ids = torch.randint(vocab, (rows, width + 1), generator=gen)
    ks = torch.randint(width + 1, (rows,), generator=gen)
    # drafts agree with the target often enough that every accepted length occurs
    draft_ids = torch.where(torch.rand(rows, width, generator=gen) < 0.7, target_ids[:, :width],
                            torch.randint(vocab, (rows, width), generator=gen))
    one_hot = torch.nn.functional.one_hot
    expected = rejection_sample(draft_ids, one_hot(draft_ids, vocab).float(), one_hot(target_ids, vocab).float(),
                                ks, torch.full((rows, width), 0.5), torch.full((rows, width + 1), 0.5))
    result = greedy_verify(draft_ids, target_ids, ks)
    assert set(result.num_accepted.tolist()) == {0, 1, 2, 3}
    assert torch.equal(result.num_accepted, expected.num_accepted)
    assert torch.equal(result.next_token_ids, expected.next_token_ids)


def test_judged_last_position_follows_target_distribution():
    """Seeded requests judge the position after the verified drafts against the draft too (no bonus draw
    from p): at K = 0 and after K accepted drafts the emitted token still follows p exactly."""
    gen = torch.Generator().manual_seed(4)
    p = torch.tensor([[0.30, 0.05, 0.20, 0.0, 0.15, 0.10, 0.15, 0.05], [0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.1, 0.1]])
    q = torch.tensor([[0.05, 0.40, 0.10, 0.10, 0.05, 0.20, 0.05, 0.05], [0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]])
    result, draft_ids = _run(p[:1], q[:1], 0, gen, judge_last=True)  # K = 0: one proposal, judged
    assert bool((result.num_accepted == 0).all())
    assert _tv(result.next_token_ids, p[0]) < TV_BOUND
    took_proposal = result.next_token_ids == draft_ids[:, 0]
    assert abs(took_proposal.float().mean().item() - float(torch.minimum(p[0], q[0]).sum())) < 0.01
    result, draft_ids = _run(p, q, 1, gen, judge_last=True)  # K = 1: two proposals, the second judged
    assert _tv(_first_token(result, draft_ids), p[0]) < TV_BOUND
    second = result.next_token_ids[result.num_accepted == 1]  # the judged position after an accepted draft
    assert _tv(second, p[1]) < TV_BOUND
    assert bool((result.num_accepted <= 1).all())
