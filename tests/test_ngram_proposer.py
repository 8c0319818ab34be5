"""Prompt-lookup proposer: exact proposals on small cases; one-hot q keeps rejection sampling exact."""

import pytest
import torch

from helix_serve.engine.ngram_proposer import NgramProposer, ngram_propose, one_hot_draft_probs
from helix_serve.engine.rejection import rejection_sample
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.engine.sequence import Sequence

N = 200_000


def _pad(rows):
    width = max(map(len, rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows]), torch.tensor([len(r) for r in rows])


def test_longest_latest_match_proposes_following_tokens():
    tokens, lengths = _pad([[1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 2, 3, 4],  # 3-gram 2,3,4 latest at 6 -> 7, 2, 3
                            [5, 6, 7, 8, 6],  # 1-gram 6 at 1 -> 7, 8, 6
                            [1, 2, 3],  # no match
                            [4, 4]])  # 1-gram 4 at 0 -> 4 (only one token follows)
    drafts, num = ngram_propose(tokens, lengths, k=3, min_n=1, max_n=3)
    assert num.tolist() == [3, 3, 0, 1]
    assert drafts[0].tolist() == [7, 2, 3]
    assert drafts[1].tolist() == [7, 8, 6]
    assert drafts[3, 0].item() == 4


def test_min_n_excludes_short_matches():
    tokens, lengths = _pad([[5, 6, 7, 8, 6]])
    _, num = ngram_propose(tokens, lengths, k=2, min_n=2, max_n=3)
    assert num.tolist() == [0]


def test_one_hot_proposal_keeps_sampled_distribution_exact():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.30, 0.05, 0.20, 0.0, 0.15, 0.10, 0.15, 0.05])
    for proposed in (0, 3, 5):  # likely, impossible, and unlikely proposals
        draft_ids = torch.full((N, 1), proposed)
        result = rejection_sample(draft_ids, one_hot_draft_probs(draft_ids, 8), p.expand(N, 2, -1),
                                  torch.ones(N, dtype=torch.long), 1 - torch.rand(N, 1, generator=gen),
                                  1 - torch.rand(N, 2, generator=gen))
        first = torch.where(result.num_accepted > 0, draft_ids[:, 0], result.next_token_ids)
        empirical = torch.bincount(first, minlength=8).float() / N
        assert 0.5 * float((empirical - p).abs().sum()) < 0.01
        assert abs(result.num_accepted.float().mean().item() - p[proposed].item()) < 0.01


def test_proposer_over_sequences_follows_their_growing_tokens():
    seqs = [Sequence("a", [1, 2, 3, 9, 1, 2], SamplingParams(), torch.Generator()),
            Sequence("b", [4, 5], SamplingParams(), torch.Generator())]
    proposer = NgramProposer(min_n=1, max_n=3)
    assert proposer.propose(seqs, 3) == [[3, 9, 1], []]
    seqs[0].token_ids += [3, 9]  # "1 2 3 9" again: the match moves on; the index grows by the new tokens
    seqs[1].token_ids += [4]
    assert proposer.propose(seqs, 3) == [[1, 2, 3], [5, 4]]
    assert seqs[0].ngram_index.num_indexed == len(seqs[0].token_ids) - 1  # n-grams ending before the last token


@pytest.mark.parametrize("min_n, max_n, alphabet", [(1, 3, 4), (2, 3, 3), (1, 1, 6), (2, 4, 2)])
def test_incremental_index_proposes_what_the_batched_reference_does(min_n, max_n, alphabet):
    """Sequences grown by 1-4 tokens per step (a small alphabet: many overlapping matches, of every length)
    propose exactly what ngram_propose finds over their whole tokens, at every step and every k."""
    gen = torch.Generator().manual_seed(min_n * 10 + max_n)
    seqs = [Sequence(str(i), torch.randint(alphabet, (1 + i,), generator=gen).tolist(), SamplingParams(),
                     torch.Generator()) for i in range(4)]
    proposer = NgramProposer(min_n, max_n)
    for step in range(60):
        k = 1 + step % 5
        tokens, lengths = _pad([s.token_ids for s in seqs])
        drafts, num = ngram_propose(tokens, lengths, k, min_n, max_n)
        assert proposer.propose(seqs, k) == [d[:n] for d, n in zip(drafts.tolist(), num.tolist())]
        for s in seqs:
            s.token_ids += torch.randint(alphabet, (1 + int(torch.randint(4, (1,), generator=gen)),),
                                         generator=gen).tolist()
