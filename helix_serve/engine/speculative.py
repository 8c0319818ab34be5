"""One batched speculative step: draft K_i tokens per sequence, verify all of them in one target
pass, keep the accepted prefix plus one recovered/bonus token. K_i = 0 is plain decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_serve.engine.model_runner import ModelRunner
from helix_serve.engine.rejection import rejection_sample
from helix_serve.engine.sampler import SamplingTensors, draw_uniforms, logits_to_probs, sample_from_probs
from helix_serve.engine.sequence import Sequence


@dataclass(slots=True)
class StepOutput:
    new_token_ids: list[list[int]]  # per sequence: accepted drafts + one target token
    num_accepted: list[int]


@dataclass(slots=True)
class _Uniforms:
    draft: torch.Tensor  # [N, K] sampling each draft token
    accept: torch.Tensor  # [N, K] accept/reject tests
    final: torch.Tensor  # [N] the recovered or bonus token

    @classmethod
    def draw(cls, seqs: list[Sequence], ks: list[int]) -> _Uniforms:
        max_k = max(ks)
        draft, accept, final = torch.ones(len(seqs), max_k), torch.ones(len(seqs), max_k), torch.ones(len(seqs))
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            u = draw_uniforms(seq.generator, 2 * k + 1)
            draft[i, :k], accept[i, :k], final[i] = u[:k], u[k : 2 * k], u[2 * k]
        return cls(draft, accept, final)


class SpeculativeDecoder:
    """Draft → verify → rejection-sample over a batch of sequences that share block tables."""

    def __init__(self, target: ModelRunner, draft: ModelRunner | None):
        self.target = target
        self.draft = draft
        self.device = target.device

    def step(self, seqs: list[Sequence], ks: list[int]) -> StepOutput:
        sampling = SamplingTensors.from_params([s.params for s in seqs], self.device)
        uniforms = _Uniforms.draw(seqs, ks)
        draft_ids, draft_probs = self._propose(seqs, ks, sampling, uniforms.draft)
        draft_lists = draft_ids.tolist()
        target_probs = self._score(seqs, ks, draft_lists, sampling)
        k_tensor = torch.tensor(ks, device=self.device)
        result = rejection_sample(draft_ids, draft_probs, target_probs, k_tensor, uniforms.accept, uniforms.final)
        num_accepted, next_ids = result.num_accepted.tolist(), result.next_token_ids.tolist()
        # KV counters change only once the whole step succeeded, so a failed step leaves them consistent.
        for seq, k, a in zip(seqs, ks, num_accepted):
            # Rollback is a length change: K/V past the accepted prefix is simply overwritten later.
            seq.num_target_cached = seq.num_tokens + a
            if k > 0:  # the draft saw everything up to its last proposal but one; keep the accepted part
                seq.num_draft_cached = seq.num_tokens + min(k - 1, a)
        new_ids = [d[:a] + [t] for d, a, t in zip(draft_lists, num_accepted, next_ids)]
        return StepOutput(new_ids, num_accepted)

    def _propose(
        self, seqs: list[Sequence], ks: list[int], sampling: SamplingTensors, uniforms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample K_i draft tokens per sequence: [N, K] ids and the [N, K, V] distributions used."""
        max_k, vocab = max(ks), self.target.vocab_size
        draft_ids = torch.zeros(len(seqs), max_k, dtype=torch.long, device=self.device)
        draft_probs = torch.zeros(len(seqs), max_k, vocab, device=self.device)
        previous: dict[int, int] = {}
        for j in range(max_k):
            rows = [i for i, k in enumerate(ks) if k > j]
            if j == 0:  # the draft catches up on every token it has not seen yet
                chunks = [seqs[i].token_ids[seqs[i].num_draft_cached :] for i in rows]
                starts = [seqs[i].num_draft_cached for i in rows]
            else:
                chunks = [[previous[i]] for i in rows]
                starts = [seqs[i].num_tokens + j - 1 for i in rows]
            logits = self.draft.logits([seqs[i].block_table for i in rows], chunks, starts, [1] * len(rows))
            index = torch.tensor(rows, device=self.device)
            probs = logits_to_probs(logits, sampling.select(index))
            tokens = sample_from_probs(probs, uniforms[index.cpu(), j])
            draft_ids[index, j], draft_probs[index, j] = tokens, probs
            previous = dict(zip(rows, tokens.tolist()))
        return draft_ids, draft_probs

    def _score(
        self, seqs: list[Sequence], ks: list[int], draft_lists: list[list[int]], sampling: SamplingTensors
    ) -> torch.Tensor:
        """One target pass over the uncached tokens plus the drafts: [N, K+1, V] target distributions."""
        chunks = [s.token_ids[s.num_target_cached :] + d[:k] for s, d, k in zip(seqs, draft_lists, ks)]
        starts = [s.num_target_cached for s in seqs]
        counts = torch.tensor(ks) + 1
        logits = self.target.logits([s.block_table for s in seqs], chunks, starts, counts.tolist())
        probs = logits_to_probs(logits, sampling.repeat(counts))  # [Σ(K_i+1), V]
        rows = torch.repeat_interleave(torch.arange(len(seqs)), counts)
        cols = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[rows]
        padded = probs.new_zeros(len(seqs), max(ks) + 1, probs.shape[-1])
        padded[rows.to(self.device), cols.to(self.device)] = probs
        return padded
