"""One batched speculative step: draft K_i tokens per sequence, verify all of them in one target
pass, keep the accepted prefix plus one recovered/bonus token. K_i = 0 is plain decoding.

Randomness. A request's uniforms are indexed by output position (sampler.position_uniform), so they
never depend on batch mates, preemption or how many draws earlier steps made. Modified rejection sampling
still makes a position's token depend on K: with K = 0 it is drawn from p, with K > 0 it is a draft from q
that passed its test, or a draw from the residual — different functions of the same uniforms. That cannot
be avoided while also accepting drafts with the optimal min(1, p/q): a token that depended on p alone
would have to agree with a proposal that depended on q alone (the draft runs before the target), and no
such scheme reaches Σ min(p, q) agreement for every pair p, q (correlated sampling's bound).
So seeded sampled requests (a seed, temperature > 0, a draft, speculation on) are "judged": the draft
proposes one token more than the target verifies (K_i + 1 proposals, K_i = 0 included), and the position
after the verified drafts is judged against the draft like the others instead of drawing a bonus from
p. Every token of such a request is then made by one rule — proposal from q_i with u_draft(i), accepted
with u_accept(i), else a draw from the residual with u_final(i) — so its tokens are the same whatever K
is, whatever its batch mates and across preemption. The exception is the first output token: every run
makes it in the request's first step, the target's prefill at K = 0, so it is drawn from p with
u_final(first) and the prefill need not wait for the draft. The price is one more draft forward per
later step (one at K = 0). Unseeded requests, whose tokens nobody can reproduce anyway, take the bonus.

Proposers. A sequence's drafts come from the engine's model proposer — the draft model, or an EAGLE head
drafting from the target's features (eagle_runner.py); either way sampled from its q after the request's
penalties, logit_bias and sampling settings — or are given (prompt lookup, ngram_proposer.py; the tokens a
grammar forces, structured/grammar.py): given proposals are deterministic, so q is one-hot on them and rejection
sampling accepts x with probability p(x) — exact under any sampling settings. Seeded sampled requests use the draft
model only: given proposals would make their tokens depend on which proposer ran (planner.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from helix_serve.device import synchronize
from helix_serve.engine.eagle_runner import EagleRunner
from helix_serve.engine.logits_processors import Penalties, PenaltyRow
from helix_serve.engine.logprobs import TokenLogprob, emitted_logprobs
from helix_serve.engine.model_runner import ModelRunner
from helix_serve.engine.rejection import RejectionResult, greedy_verify, rejection_sample
from helix_serve.engine.sampler import (Purpose, SamplingTensors, argmax, logits_to_probs, position_uniform,
                                        sample_from_probs, sampling_row)
from helix_serve.engine.sequence import KeptFeatures, Sequence
from helix_serve.engine.step_cost import PassShape, PassTiming, StepTiming
from helix_serve.engine.structured.masks import StepMasks
from helix_serve.model.attention import gathered_context

HEAD_BACKLOG = 64  # tokens an EAGLE head in use may trail its sequence by before it catches up without drafting
IDLE_HEAD_BACKLOG = 1024  # ...and an idle one (`Draft.catch_up`): bounds the features kept (~7 MB per sequence)
GREEDY_UNIFORM = 0.5  # greedy rows use one-hot p and q: any uniform gives the same tokens


class SequenceInputError(Exception):
    """One sequence's inputs for a step could not be built. Nothing ran: only that sequence should fail."""

    def __init__(self, seq: Sequence, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.seq = seq


@dataclass(slots=True)
class Draft:
    """How one sequence drafts in a step."""

    k: int = 0  # draft tokens the target verifies
    tokens: list[int] | None = None  # given proposals (lookup, grammar-forced), at least k; None: the model samples
    judged: bool = False  # the draft model proposes k + 1 and the last position is judged (module docstring)
    follow: bool = True  # the model proposer may draft for it later (an EAGLE head keeps its features)
    catch_up: bool = True  # the head catches up outside drafting steps: it is in use at this load (llm_engine.py)

    @property
    def num_proposals(self) -> int:
        return self.k + self.judged

    @property
    def by_model(self) -> bool:
        return self.tokens is None and self.num_proposals > 0


@dataclass(slots=True)
class StepOutput:
    new_token_ids: list[list[int]]  # per sequence: accepted drafts + one target token
    num_accepted: list[int]
    logprobs: list[list[TokenLogprob] | None]  # per sequence, for its new tokens; None when not asked
    timing: StepTiming


@dataclass(slots=True)
class _Row:
    """One sequence's part of a step, built on its own so that a bad one fails alone."""

    sampling: tuple[float, int, float, float]
    penalties: PenaltyRow | None
    num_proposals: int  # draft tokens proposed: K, or K + 1 when the last position is judged
    draft: list[float]  # [num_proposals] uniforms per purpose, for positions n, n+1, ...
    accept: list[float]  # [num_proposals]
    final: list[float]  # [K + 1]

    @classmethod
    def build(cls, seq: Sequence, draft: Draft, vocab_size: int) -> _Row:
        sampling, penalties = sampling_row(seq.params, vocab_size), PenaltyRow.of(seq)
        k, num_proposals = draft.k, draft.num_proposals
        if seq.params.greedy:
            fixed = [GREEDY_UNIFORM] * num_proposals
            return cls(sampling, penalties, num_proposals, fixed, fixed, [GREEDY_UNIFORM] * (k + 1))
        seed, start = seq.generator.initial_seed(), seq.num_tokens  # the request's seed; the first new position

        def uniforms(purpose: Purpose, count: int) -> list[float]:
            return [position_uniform(seed, start + j, purpose) for j in range(count)]

        return cls(sampling, penalties, num_proposals, uniforms(Purpose.DRAFT, num_proposals),
                   uniforms(Purpose.ACCEPT, num_proposals), uniforms(Purpose.FINAL, k + 1))


@dataclass(slots=True)
class _StepInputs:
    sampling: SamplingTensors
    penalties: Penalties | None
    num_proposals: list[int]
    judged: torch.Tensor  # [N] bool
    draft_uniforms: torch.Tensor  # [N, D] with D = max proposals
    accept_uniforms: torch.Tensor  # [N, D]
    final_uniforms: torch.Tensor  # [N, K+1]
    greedy: bool  # every row is greedy: tokens are argmaxes, no distributions needed (rejection.greedy_verify)
    grammar: StepMasks | None = None  # structured outputs: masks every position, draft and target alike

    @classmethod
    def stack(cls, rows: list[_Row], ks: list[int], device: torch.device, vocab_size: int) -> _StepInputs:
        width, max_k = max(r.num_proposals for r in rows), max(ks)
        draft, accept, final = (torch.ones(len(rows), n) for n in (width, width, max_k + 1))
        for i, row in enumerate(rows):
            draft[i, : row.num_proposals] = torch.tensor(row.draft)
            accept[i, : row.num_proposals] = torch.tensor(row.accept)
            final[i, : len(row.final)] = torch.tensor(row.final)
        judged = torch.tensor([r.num_proposals > k for r, k in zip(rows, ks)])
        sampling = SamplingTensors.from_rows([r.sampling for r in rows], device)
        penalties = Penalties.build([r.penalties for r in rows], vocab_size, device)
        greedy = all(r.sampling[0] == 0.0 for r in rows)
        return cls(sampling, penalties, [r.num_proposals for r in rows], judged, draft, accept, final, greedy)

    def adjust(self, logits: torch.Tensor, seq_rows: torch.Tensor, earlier_ids: torch.Tensor,
               num_earlier: torch.Tensor) -> torch.Tensor:
        """[R, V] logits at R positions → after penalties, bias and the grammar (in place where it can), each
        position's penalties counting the drafts before it in this step (see Penalties.apply for the arguments)."""
        if self.penalties is not None:
            logits = self.penalties.apply(logits, seq_rows, earlier_ids, num_earlier)
        if self.grammar is not None:
            logits = self.grammar.apply(logits, seq_rows, earlier_ids, num_earlier)
        return logits

    def probs(self, logits: torch.Tensor, seq_rows: torch.Tensor) -> torch.Tensor:
        """Adjusted [R, V] logits → the distributions sampled from there."""
        return logits_to_probs(logits, self.sampling.select(seq_rows))


class SpeculativeDecoder:
    """Draft → verify → rejection-sample over a batch of sequences that share block tables."""

    def __init__(self, target: ModelRunner, draft: ModelRunner | EagleRunner | None):
        self.target = target
        self.draft = draft  # the model-based proposer: a draft model, or an EAGLE head on the target's features
        self.eagle = isinstance(draft, EagleRunner)
        self.device = target.device

    def copy_block(self, source: int, dest: int) -> None:
        """Copy one block's K/V, every layer, in the target's pool and the proposer's (a prefix-cache copy)."""
        for runner in (self.target, self.draft):
            if runner is not None:
                for pool in (runner.kv_cache.k, runner.kv_cache.v):
                    pool[:, dest].copy_(pool[:, source])

    def judges_last(self, seq: Sequence) -> bool:
        """Seeded sampled requests with speculation on get K-independent tokens (see the module docstring)."""
        params = seq.params
        reproducible = params.speculative and params.seed is not None and not params.greedy
        # NOTE: not with an EAGLE head: it drafts from the target's features, which a recompute prefill (the
        # first step after a preemption) has not produced yet. Its seeded tokens stay exact, not K-independent.
        return self.draft is not None and not self.eagle and reproducible and seq.num_output_tokens > 0

    @torch.inference_mode()  # the runners' logits are inference tensors, and the penalties adjust them in place
    def step(self, seqs: list[Sequence], drafts: list[Draft]) -> StepOutput:
        """Raises SequenceInputError (before running anything) if one sequence's inputs cannot be built."""
        ks = [d.k for d in drafts]
        inputs = self._inputs(seqs, drafts)
        timing = StepTiming(drafted_tokens=sum(ks))
        draft_ids, draft_probs = self._propose(seqs, drafts, inputs, timing)
        draft_lists = draft_ids.tolist()
        target, target_logits, first_rows, features = self._score(seqs, ks, draft_ids, draft_lists, inputs, timing)
        result = self._judge(draft_ids, draft_probs, target, ks, inputs)
        num_accepted, next_ids = result.num_accepted.tolist(), result.next_token_ids.tolist()
        # KV counters change only once the whole step succeeded, so a failed step leaves them consistent.
        if self.eagle:
            self._keep_features(seqs, drafts, ks, num_accepted, features)
            self._catch_up_head(seqs, drafts, timing)
        for seq, draft, a in zip(seqs, drafts, num_accepted):
            # Rollback is a length change: K/V past the accepted prefix is simply overwritten later.
            seq.num_target_cached = seq.num_tokens + a
            if draft.by_model and not self.eagle:  # the draft saw all but its last proposal; keep the accepted part
                seq.num_draft_cached = seq.num_tokens + min(draft.num_proposals - 1, a)
        new_ids = [d[:a] + [t] for d, a, t in zip(draft_lists, num_accepted, next_ids)]
        logprobs = emitted_logprobs(target_logits, first_rows, new_ids, [s.params.logprobs for s in seqs])
        return StepOutput(new_ids, num_accepted, logprobs, timing)

    def _judge(self, draft_ids: torch.Tensor, draft_probs: torch.Tensor | None, target: torch.Tensor,
               ks: list[int], inputs: _StepInputs) -> RejectionResult:
        """Rejection sampling; a greedy batch compares argmaxes (`target` holds the target's tokens, not
        its distributions), which is what the same rule does with one-hot p and q."""
        k_tensor = torch.tensor(ks, device=self.device)
        if inputs.greedy:
            return greedy_verify(draft_ids, target, k_tensor)
        return rejection_sample(draft_ids, draft_probs, target, k_tensor, inputs.accept_uniforms,
                                inputs.final_uniforms, inputs.judged)

    def _inputs(self, seqs: list[Sequence], drafts: list[Draft]) -> _StepInputs:
        rows = []
        for seq, draft in zip(seqs, drafts):
            try:
                rows.append(_Row.build(seq, draft, self.target.vocab_size))
            except Exception as exc:  # noqa: BLE001 - this request's own settings: it fails alone
                raise SequenceInputError(seq, exc) from exc
        inputs = _StepInputs.stack(rows, [d.k for d in drafts], self.device, self.target.vocab_size)
        inputs.grammar = StepMasks.build(seqs, self.target.vocab_size)
        return inputs

    def _propose(self, seqs: list[Sequence], drafts: list[Draft], inputs: _StepInputs,
                 timing: StepTiming) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each sequence's proposals: [N, D] ids and the [N, D, V] distributions they came from
        (sampled from the draft model, or given and one-hot; None for a greedy batch, whose proposals are
        argmaxes). Times each draft pass into `timing`."""
        vocab, width = self.target.vocab_size, max(inputs.num_proposals)
        draft_ids = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        draft_probs = None if inputs.greedy else torch.zeros(len(seqs), width, vocab, device=self.device)
        for i, draft in enumerate(drafts):
            if draft.tokens is not None and draft.k:
                given = torch.tensor(draft.tokens[: draft.k], device=self.device)
                draft_ids[i, : draft.k] = given
                if draft_probs is not None:
                    draft_probs[i, torch.arange(draft.k, device=self.device), given] = 1.0
        counts = [d.num_proposals if d.by_model else 0 for d in drafts]
        previous: dict[int, int] = {}
        hidden: dict[int, torch.Tensor] = {}  # EAGLE: each row's last output feature
        for j in range(max(counts)):
            rows = [i for i, n in enumerate(counts) if n > j]
            start = time.perf_counter()
            if self.eagle:
                logits, chunks, starts = self._eagle_logits(seqs, rows, j, previous, hidden)
            else:
                logits, chunks, starts = self._draft_logits(seqs, rows, j, previous)
            synchronize(self.device)
            forwarded = time.perf_counter()
            index = torch.tensor(rows, device=self.device)
            logits = inputs.adjust(logits, index, draft_ids[index, :j], torch.full((len(rows),), j))
            if draft_probs is None:
                tokens = argmax(logits)
            else:
                probs = inputs.probs(logits, index)
                tokens = sample_from_probs(probs, inputs.draft_uniforms[index.cpu(), j])
                draft_probs[index, j] = probs
            draft_ids[index, j] = tokens
            previous = dict(zip(rows, tokens.tolist()))  # waits for the pass
            passes = timing.heads if self.eagle else timing.drafts
            passes.append(PassTiming(_shape(chunks, starts), forwarded - start))
            timing.processing_s += time.perf_counter() - forwarded
            timing.processed_rows += len(rows)
        return draft_ids, draft_probs

    def _draft_logits(self, seqs: list[Sequence], rows: list[int], j: int,
                      previous: dict[int, int]) -> tuple[torch.Tensor, list[list[int]], list[int]]:
        """Pass j of the draft model (j = 0 catches up on every token it has not seen yet): its logits, and the
        chunks and starts it ran on."""
        if j == 0:
            chunks = [seqs[i].token_ids[seqs[i].num_draft_cached :] for i in rows]
            starts = [seqs[i].num_draft_cached for i in rows]
        else:
            chunks = [[previous[i]] for i in rows]
            starts = [seqs[i].num_tokens + j - 1 for i in rows]
        logits = self.draft.logits([seqs[i].block_table for i in rows], chunks, starts, [1] * len(rows))
        return logits, chunks, starts

    def _eagle_logits(self, seqs: list[Sequence], rows: list[int], j: int, previous: dict[int, int],
                      hidden: dict[int, torch.Tensor]) -> tuple[torch.Tensor, list[list[int]], list[int]]:
        """Step j of chained EAGLE drafting. j = 0: the head catches up on entries num_draft_cached .. n-2 from
        the target's kept features (eagle_runner.py), its last entry drafting token n; j > 0: entry n-2+j is
        fed the row's own output feature and the token it drafted. Also returns the chunks and starts."""
        picked = [seqs[i] for i in rows]
        if j == 0:
            features = torch.cat([s.eagle_features.first(s.num_tokens - 1 - s.num_draft_cached) for s in picked])
            features = self.draft.head.fuse(features)
            chunks = [s.token_ids[s.num_draft_cached + 1 :] for s in picked]
            starts = [s.num_draft_cached for s in picked]
        else:
            features = torch.stack([hidden[i] for i in rows])
            chunks = [[previous[i]] for i in rows]
            starts = [s.num_tokens - 2 + j for s in picked]
        logits, out = self.draft.logits([s.block_table for s in picked], features, chunks, starts)
        hidden.update(zip(rows, out))
        return logits, chunks, starts

    @staticmethod
    def _keep_features(seqs: list[Sequence], drafts: list[Draft], ks: list[int], num_accepted: list[int],
                       features: torch.Tensor) -> None:
        """Keep the target features of verified positions the head has not consumed: after this,
        `eagle_features` covers positions num_draft_cached .. the new num_target_cached - 1."""
        offset = 0
        for seq, draft, k, a in zip(seqs, drafts, ks, num_accepted):
            uncached = seq.num_tokens - seq.num_target_cached
            fresh = features[offset : offset + uncached + a]  # the target's pass: verified positions only
            offset += uncached + k
            if not draft.follow:
                continue
            kept = seq.eagle_features
            if kept is None or seq.num_draft_cached + len(kept) != seq.num_target_cached:  # (re)admitted
                kept = seq.eagle_features = KeptFeatures()
            kept.append(fresh)
            if draft.by_model:  # the head caught up to entry n - 2 while drafting
                kept.drop(seq.num_tokens - 1 - seq.num_draft_cached)
                seq.num_draft_cached = seq.num_tokens - 1

    def _catch_up_head(self, seqs: list[Sequence], drafts: list[Draft], timing: StepTiming) -> None:
        """The head runs over a prompt's features right after its prefill (EAGLE's own order), so drafting later
        only catches up on the few tokens since: left for the first drafting step, a long prompt's catch-up makes
        drafting look too expensive to the planner for good, and the debt only grows. A sequence that has not
        drafted for HEAD_BACKLOG steps catches up too, which bounds the features it keeps (one pass per
        HEAD_BACKLOG tokens: a fraction of a percent of those steps). While the head is idle at this load
        (`Draft.catch_up` off) that wait is IDLE_HEAD_BACKLOG tokens. The prompt's catch-up always runs: it
        writes the head's K/V of the prompt's blocks, without which the prefix cache could not reuse them for
        the head (block_manager.py), and it is a small part of a prefill step."""
        def due(seq: Sequence, draft: Draft) -> bool:
            behind = seq.num_tokens - 1 - seq.num_draft_cached
            # A prefill step: more than the newest token was uncached (num_target_cached is not yet updated here).
            prefill = seq.num_tokens - seq.num_target_cached > 1
            return behind > 0 and (prefill or behind >= (HEAD_BACKLOG if draft.catch_up else IDLE_HEAD_BACKLOG))

        picked = [s for s, d in zip(seqs, drafts) if d.k == 0 and d.follow and due(s, d)]
        if not picked:
            return
        start = time.perf_counter()
        features = torch.cat([s.eagle_features.first(s.num_tokens - 1 - s.num_draft_cached) for s in picked])
        chunks = [s.token_ids[s.num_draft_cached + 1 : s.num_tokens] for s in picked]
        starts = [s.num_draft_cached for s in picked]
        self.draft.logits([s.block_table for s in picked], self.draft.head.fuse(features), chunks, starts)
        synchronize(self.device)
        timing.heads.append(PassTiming(_shape(chunks, starts), time.perf_counter() - start))
        for s in picked:
            s.eagle_features.drop(s.num_tokens - 1 - s.num_draft_cached)
            s.num_draft_cached = s.num_tokens - 1

    def _score(self, seqs: list[Sequence], ks: list[int], draft_ids: torch.Tensor, draft_lists: list[list[int]],
               inputs: _StepInputs, timing: StepTiming
               ) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor | None]:
        """One target pass over the uncached tokens plus the drafts. Returns the [N, K+1, V] target
        distributions (a greedy batch: the [N, K+1] argmax tokens), the raw [Σ(K_i+1), V] logits behind them,
        each sequence's first row there, and the captured features of every token of the pass (with an EAGLE
        head; else None)."""
        chunks = [s.token_ids[s.num_target_cached :] + d[:k] for s, d, k in zip(seqs, draft_lists, ks)]
        starts = [s.num_target_cached for s in seqs]
        counts = torch.tensor(ks) + 1
        tables = [s.block_table for s in seqs]
        start = time.perf_counter()
        if self.eagle:  # the same pass also returns the head's features: no extra target pass
            logits, features = self.target.logits_and_features(tables, chunks, starts, counts.tolist(),
                                                               self.draft.capture_layers)
        else:
            logits, features = self.target.logits(tables, chunks, starts, counts.tolist()), None
        synchronize(self.device)
        forwarded = time.perf_counter()
        rows = torch.repeat_interleave(torch.arange(len(seqs)), counts)
        first_rows = torch.cumsum(counts, 0) - counts
        cols = torch.arange(len(rows)) - first_rows[rows]
        raw = logits.clone() if any(s.params.logprobs is not None for s in seqs) else logits  # logprobs read it
        adjusted = inputs.adjust(raw, rows, draft_ids[rows.to(self.device)], cols)  # [Σ(K_i+1), V]
        scored = argmax(adjusted) if inputs.greedy else inputs.probs(adjusted, rows)
        padded = _padded(scored, rows.to(self.device), cols.to(self.device), len(seqs), max(ks) + 1)
        synchronize(self.device)
        timing.target = PassTiming(_shape(chunks, starts), forwarded - start)
        timing.processing_s += time.perf_counter() - forwarded
        timing.processed_rows += len(rows)
        return padded, logits, first_rows.tolist(), features


def _padded(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, num_rows: int, width: int) -> torch.Tensor:
    """Per-position values [Σ(K_i+1), ...] → [N, K+1, ...] (a view when every row has K+1 positions)."""
    if len(values) == num_rows * width:
        return values.view(num_rows, width, *values.shape[1:])
    padded = values.new_zeros(num_rows, width, *values.shape[1:])
    padded[rows, cols] = values
    return padded


def _shape(chunks: list[list[int]], starts: list[int]) -> PassShape:
    """A pass over these chunks: tokens, rows, and the K/V its attention gathers (attention.gathered_context)."""
    query_lens = [len(c) for c in chunks]
    return PassShape(sum(query_lens), len(chunks),
                     gathered_context(query_lens, [s + n for s, n in zip(starts, query_lens)]),
                     max(query_lens, default=0))
