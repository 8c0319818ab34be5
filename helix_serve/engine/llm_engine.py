"""The engine loop: schedule → speculative step → append tokens, stop, stream, free.

Usable on its own (CLI, tests, benchmarks) and driven by the Serve replica's step loop.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass

import torch

from helix_serve.config import EngineConfig
from helix_serve.device import resolve_device
from helix_serve.engine.block_manager import BlockManager
from helix_serve.engine.eagle_runner import EagleRunner
from helix_serve.engine.logprobs import TokenLogprob
from helix_serve.engine.model_runner import ModelRunner
from helix_serve.engine.ngram_proposer import NgramProposer
from helix_serve.engine.planner import Choice, Options, Planner, Proposer, measured_alpha
from helix_serve.engine.sampler import sampling_row
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.engine.scheduler import Scheduler
from helix_serve.engine.sequence import Sequence
from helix_serve.engine.speculative import Draft, SequenceInputError, SpeculativeDecoder
from helix_serve.engine.step_cost import StepCostModel, calibrate
from helix_serve.engine.stop_checker import StopChecker
from helix_serve.engine.structured.constraint import ConstraintError
from helix_serve.engine.structured.grammar import GrammarCompiler, Matcher
from helix_serve.model.eagle_head import EagleHead
from helix_serve.model.loader import ModelPair, load_model_pair
from helix_serve.model.paged_llm import KVCache

logger = logging.getLogger(__name__)
OOM_REGROW_STEPS = 16
HEAD_USE_WEIGHT = 0.05  # of one step in `head_use`
HEAD_IN_USE = 0.2  # `head_use` above which the head catches up outside drafting steps
DEFAULT_DRAFT_COST_RATIO = 0.3  # only when calibration could not run


def is_out_of_memory(exc: BaseException) -> bool:
    """Device allocation failures: torch's OOM error type (CUDA, newer backends) or its message."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: 2.5+
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower()


class RequestRejectedError(ValueError):
    """A request that this engine can never serve (empty, too long for the context or the KV pool)."""


class PromptTooLongError(RequestRejectedError):
    """The prompt alone fills the model's context."""


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: a delta, and the whole result once finished."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    num_drafted: int = 0  # this step: the emitted chunk is `num_accepted` drafts + one target token
    num_accepted: int = 0
    proposer: str | None = None  # who drafted this step's num_drafted tokens ("draft", "eagle" or "ngram")
    text: str | None = None  # set when finished
    token_ids: list[int] | None = None  # set when finished
    stats: dict | None = None  # set when finished
    new_logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for logprobs
    # every output token's: only in `generate`'s results (the engine keeps none; a stream's reader gathers them)
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class _Planned:
    """A running sequence's part of the next step, as the planner decided it."""

    options: Options
    choice: Choice


class LLMEngine:
    def __init__(self, config: EngineConfig, pair: ModelPair | None = None):
        self.config = config
        device = resolve_device(config.device) if pair is None else pair.target.device
        self.pair = pair or load_model_pair(config.target_model, config.draft_model, device, config.dtype,
                                            config.quantization, config.int4_dense_rows)
        self.tokenizer = self.pair.tokenizer
        target = self.pair.target
        self.device = target.device
        self.max_model_len = min(config.max_model_len or target.shape.max_model_len, target.shape.max_model_len)
        vocab = target.shape.vocab_size
        # What else decides the K/V a prefix-cache hit reuses.
        cache_key = "|".join(map(str, (config.target_model, config.draft_model, config.eagle_head, target.dtype,
                                       target.quantization)))
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                                          cache_key, draft_needs_features=config.eagle_head is not None)
        self.kv_bytes = 0
        target_runner = self._runner(target, vocab)
        if config.eagle_head is not None:  # a pair handed in with a draft model too: the head replaces it
            draft_runner = self._eagle_runner(config.eagle_head, vocab)
        else:
            draft_runner = self._runner(self.pair.draft, vocab) if self.pair.draft is not None else None
        # The model-based proposer: a draft model or an EAGLE head, never both (EngineConfig).
        self.model_proposer = Proposer.EAGLE if config.eagle_head is not None else Proposer.DRAFT
        self.decoder = SpeculativeDecoder(target_runner, draft_runner)
        self.block_manager.copy_block = self.decoder.copy_block
        self.method = config.speculative_method or ("hybrid" if draft_runner is not None else "ngram")
        if self.method in ("draft", "eagle") and self.method != self._loaded_proposer:
            raise ValueError(f"speculative_method {self.method!r} needs " +
                             ("a draft model" if self.method == "draft" else "an EAGLE head (eagle_head)"))
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.planner = Planner(config.k_max, config.max_num_batched_tokens, model=self.model_proposer,
                               model_prior=measured_alpha(config.eagle_head or config.draft_model))
        self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.step_costs = self._step_costs()
        self.step_cost_log: deque[tuple[float, float]] = deque(maxlen=4096)  # (predicted, measured) seconds per step
        self.stop_checker = StopChecker(self.tokenizer, self._eos_ids(), self.max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer, vocab, self._eos_ids())
        self.seqs: dict[str, Sequence] = {}
        self._steps_since_oom = 0
        self._seed_rng = torch.Generator().manual_seed(config.seed)
        # The share of recent steps in which the plan drafted with the EAGLE head (probes aside): under a load
        # where it does not pay, catching it up every HEAD_BACKLOG tokens of every sequence buys nothing, so an
        # idle head waits longer (speculative.py: IDLE_HEAD_BACKLOG) and catches up when it drafts.
        self.head_use = 1.0

    def _step_costs(self) -> StepCostModel:
        """The planner's step-cost curves: configured ratios, else measured now (and refreshed by each step)."""
        config = self.config
        if config.draft_cost_ratio is not None and config.verify_cost_ratio is not None:
            return StepCostModel.from_ratios(config.draft_cost_ratio, config.verify_cost_ratio,
                                             config.max_num_batched_tokens, self.decoder.eagle)
        limit = self.max_model_len  # calibration positions stay inside the model's context
        long_context = min(512, limit // 2)
        try:
            costs = calibrate(self.decoder.target, self.decoder.draft, self.block_manager,
                              max_tokens=min(256, config.max_num_batched_tokens, limit - long_context - 1),
                              max_rows=config.max_num_seqs, base_context=min(64, limit // 4),
                              long_context=long_context)
        except ValueError:  # a pool too small to calibrate in
            return StepCostModel.from_ratios(DEFAULT_DRAFT_COST_RATIO, 0.0, config.max_num_batched_tokens,
                                             self.decoder.eagle)
        c, v = costs.ratios
        logger.info("step costs: c=%.3f v=%.3f (target %.2f ms)", c, v, costs.target(1) * 1e3)
        return costs

    @property
    def cost_ratios(self) -> tuple[float, float]:
        """(c, v) at batch 1 from the step-cost curves (a draft pass, each extra verified token)."""
        return self.step_costs.ratios

    def _runner(self, model, vocab: int) -> ModelRunner:
        kv = KVCache.allocate(model.shape, self.config.num_kv_blocks, self.config.block_size, model.dtype, model.device)
        self.kv_bytes += kv.num_bytes
        return ModelRunner(model, kv, self.config.block_size, vocab)

    def _eagle_runner(self, path: str, vocab: int) -> EagleRunner:
        target = self.pair.target
        head = EagleHead.load(path, target.embed_tokens, target.dtype)
        if target.quantization == "int4":  # the head's passes in 4 bits too: their cost ratio c is what pays
            head.quantize_int4(target.int4_dense_rows)  # wide passes (prompt catch-ups) as the target's
        if head.config.target_vocab_size != vocab or max(head.config.capture_layers) > target.shape.num_layers:
            raise ValueError(f"{path}: this EAGLE head was made for another target")
        kv = KVCache.allocate(head.shape, self.config.num_kv_blocks, self.config.block_size, head.dtype, head.device)
        self.kv_bytes += kv.num_bytes
        return EagleRunner(head, kv, self.config.block_size, vocab)

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        generation_eos = getattr(self.pair.target.hf_model.generation_config, "eos_token_id", None)
        ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        return {i for i in ids if i is not None}

    @property
    def has_draft(self) -> bool:
        return self.decoder.draft is not None

    @property
    def proposers(self) -> list[str]:
        """What this engine can draft with: its model-based proposer, if loaded, prompt lookup, and the tokens a
        structured output's grammar forces."""
        given = [Proposer.NGRAM.value, Proposer.GRAMMAR.value]
        return [self.model_proposer.value, *given] if self.has_draft else given

    @property
    def _loaded_proposer(self) -> str | None:
        """"draft" or "eagle": which model-based proposer is loaded (None: neither)."""
        return self.model_proposer.value if self.has_draft else None

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raises RequestRejectedError for one that can never be served."""
        token_ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        self._validate(token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.seqs:
            raise RequestRejectedError(f"request id {request_id!r} is already running")
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seed_rng))
        # NOTE: the generator only carries the seed (mod 2**64); draws come from sampler.position_uniform.
        seq = Sequence(request_id, token_ids, params, torch.Generator().manual_seed(seed % 2**64))
        seq.grammar = self._grammar(params)
        seq.drafts_by_model = params.speculative and self._may_use(seq, self.model_proposer)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise RequestRejectedError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(token_ids)} tokens; this model's context is {self.max_model_len} tokens"
            )
        vocab = self.pair.target.shape.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise RequestRejectedError(f"prompt token ids must be in [0, {vocab})")
        if any(token_id >= vocab for token_id in params.logit_bias):
            raise RequestRejectedError(f"logit_bias token ids must be in [0, {vocab})")
        longest = min(len(token_ids) + params.max_tokens, self.max_model_len)
        pool_tokens = self.config.num_kv_blocks * self.config.block_size
        if self.block_manager.blocks_for(longest) > self.config.num_kv_blocks:
            raise RequestRejectedError(
                f"prompt + max_tokens = {longest} tokens can never fit the KV pool ({pool_tokens} tokens)"
            )
        if (params.num_speculative_tokens or 0) > self.config.k_max:
            raise RequestRejectedError(f"num_speculative_tokens must be <= {self.config.k_max}")
        if params.speculative_method in ("draft", "eagle") and params.speculative_method != self._loaded_proposer:
            raise RequestRejectedError(f"speculative_method {params.speculative_method!r} needs "
                                       f"{'a draft model' if params.speculative_method == 'draft' else 'an EAGLE head'}"
                                       ", and none is loaded")
        try:  # what each step builds from the settings: a request it cannot build for is refused here
            sampling_row(params, vocab)
        except (TypeError, ValueError, OverflowError) as exc:
            raise RequestRejectedError(f"invalid sampling settings: {exc}") from exc

    def _grammar(self, params: SamplingParams) -> Matcher | None:
        """A fresh matcher for a constrained request (compiled once per distinct constraint), else None."""
        if params.structured is None:
            return None
        try:
            return self.grammars.compile(params.structured)
        except ConstraintError as exc:
            raise RequestRejectedError(str(exc)) from exc

    def max_new_tokens(self, num_prompt_tokens: int) -> int:
        """The most tokens a prompt this long can be given: what the context and the KV pool leave (>= 1)."""
        pool_tokens = self.config.num_kv_blocks * self.config.block_size
        return max(1, min(self.max_model_len, pool_tokens) - num_prompt_tokens)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. False if it is unknown or already finished."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Advance every scheduled sequence by one speculative step."""
        expired = self._expire_deadlines()
        plan = self._plan()
        if self.decoder.eagle:
            drafting = any(p.choice.proposer is Proposer.EAGLE and p.choice.k and not p.choice.probe
                           for p in plan.values())
            self.head_use += HEAD_USE_WEIGHT * (drafting - self.head_use)
        seqs, ks = self.scheduler.schedule(lambda seq, _: plan[seq.request_id].choice.k)
        drafts = [self._draft(seq, k, plan.get(seq.request_id)) for seq, k in zip(seqs, ks)]
        refused: list[RequestOutput] = []
        while seqs:
            try:
                return expired + refused + self._step_batch(seqs, drafts, plan)
            except SequenceInputError as exc:  # nothing ran: that request fails alone, its batch mates step
                logger.warning("request %s failed while building its step inputs: %s", exc.seq.request_id, exc)
                refused.append(self._fail(exc.seq, f"invalid request: {exc}"))
                seqs, drafts = self._without(exc.seq, seqs, drafts)
        return expired + refused

    def _step_batch(self, seqs: list[Sequence], drafts: list[Draft], plan: dict[str, _Planned]) -> list[RequestOutput]:
        start = time.perf_counter()
        try:
            out = self.decoder.step(seqs, drafts)
        except SequenceInputError:
            raise
        except Exception as exc:  # a failed step must not leak blocks or wedge other requests
            if is_out_of_memory(exc):
                return self._recover_from_oom(seqs, exc)
            logger.exception("engine step failed for %d sequences", len(seqs))
            return [self._fail(seq, f"{type(exc).__name__}: {exc}") for seq in seqs]
        self._regrow_batch()
        outputs = [self._advance(seq, d, plan.get(seq.request_id), new, a, lp)
                   for seq, d, new, a, lp in zip(seqs, drafts, out.new_token_ids, out.num_accepted, out.logprobs)]
        out.timing.total_s = time.perf_counter() - start
        self.step_cost_log.append((self.step_costs.predict(out.timing), out.timing.total_s))
        self.step_costs.observe(out.timing)
        return outputs

    @staticmethod
    def _without(gone: Sequence, seqs: list[Sequence], drafts: list[Draft]) -> tuple[list[Sequence], list[Draft]]:
        kept = [(s, d) for s, d in zip(seqs, drafts) if s is not gone]
        return [s for s, _ in kept], [d for _, d in kept]

    def _recover_from_oom(self, seqs: list[Sequence], exc: Exception) -> list[RequestOutput]:
        """The device ran out of memory mid-step. Nothing was committed (KV counters move only after a
        step succeeds), so: free cached allocator memory, halve the batch by preempting the largest
        sequences for recompute, and go on. A sequence that fails alone gets a clear error."""
        logger.warning("out of memory in a step of %d sequences: %s", len(seqs), exc)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(seqs) == 1:
            return [self._fail(seqs[0], f"out of memory: {exc}")]
        self.scheduler.max_num_seqs = max(1, len(seqs) // 2)
        self._steps_since_oom = 0
        for seq in sorted(seqs, key=lambda s: s.num_tokens, reverse=True)[: len(seqs) - self.scheduler.max_num_seqs]:
            self.scheduler.preempt(seq)
        return []

    def _regrow_batch(self) -> None:
        """After an OOM, let the batch grow back by one sequence every OOM_REGROW_STEPS good steps."""
        if self.scheduler.max_num_seqs < self.config.max_num_seqs:
            self._steps_since_oom += 1
            if self._steps_since_oom % OOM_REGROW_STEPS == 0:
                self.scheduler.max_num_seqs += 1

    def _expire_deadlines(self) -> list[RequestOutput]:
        """End requests past their deadline (running or still waiting) and free their blocks."""
        now = time.perf_counter()
        expired = [s for s in self.seqs.values()
                   if s.params.timeout_s is not None and now - s.stats.arrival_time > s.params.timeout_s]
        for seq in expired:
            seq.finish_reason = "timeout"
            self._finish(seq)
        return [self._output(seq, [], 0, 0) for seq in expired]

    # ---- speculation: which proposer and how many tokens, per sequence (planner.py) -------------

    def _plan(self) -> dict[str, _Planned]:
        """The planner's choice for every running sequence (newly admitted ones prefill at K = 0)."""
        running = self.scheduler.running
        ready = {s.request_id for s in running if s.params.speculative and s.num_target_cached >= s.num_tokens - 1}
        lookup = [s for s in running if s.request_id in ready and self._may_use(s, Proposer.NGRAM)]
        found = dict(zip((s.request_id for s in lookup), self.ngram.propose(lookup, self.config.k_max)))
        for seq in lookup:  # proposals the grammar forbids are cut before verification
            if seq.grammar is not None and found[seq.request_id]:
                found[seq.request_id] = found[seq.request_id][: seq.grammar.valid_prefix(found[seq.request_id])]
        forced = {s.request_id: s.grammar.forced_tokens() for s in running
                  if s.request_id in ready and s.grammar is not None and self._may_use(s, Proposer.GRAMMAR)}
        options = [self._options(s, found.get(s.request_id, []), s.request_id in ready, forced.get(s.request_id, []))
                   for s in running]
        newcomers = self.scheduler.admissions() if self.scheduler.waiting else []
        choices = self.planner.plan(options, self.step_costs, newcomers)
        return {o.seq.request_id: _Planned(o, c) for o, c in zip(options, choices)}

    def _options(self, seq: Sequence, ngram_tokens: list[int], ready: bool, forced_tokens: list[int]) -> Options:
        params = seq.params
        room = min(params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
        fixed_k = params.num_speculative_tokens
        fixed_k = self.config.num_speculative_tokens if fixed_k is None else fixed_k
        return Options(seq, seq.num_tokens - seq.num_target_cached, room if ready else 0,
                       ready and self._may_use(seq, self.model_proposer), ngram_tokens, fixed_k, self._judged(seq),
                       forced_tokens)

    def _may_use(self, seq: Sequence, proposer: Proposer) -> bool:
        method = seq.params.speculative_method or self.method
        if proposer in (Proposer.DRAFT, Proposer.EAGLE):  # a model: only the loaded one, by its name or hybrid
            return self.has_draft and proposer is self.model_proposer and method in ("hybrid", proposer.value)
        seeded_sampling = seq.params.seed is not None and not seq.params.greedy  # draft only: see speculative.py
        if proposer is Proposer.GRAMMAR:  # forced tokens are free and certain: every method uses them
            return not seeded_sampling
        return method in ("ngram", "hybrid") and not seeded_sampling

    def _judged(self, seq: Sequence) -> bool:
        return self.decoder.judges_last(seq) and self._may_use(seq, self.model_proposer)

    def _draft(self, seq: Sequence, k: int, planned: _Planned | None) -> Draft:
        """The decoder's instructions; k is the scheduler's (it drops to 0 when the KV pool is short)."""
        follow = seq.drafts_by_model
        catch_up = self.head_use >= HEAD_IN_USE
        if planned is None:  # admitted this step
            return Draft(0, None, self._judged(seq), follow, catch_up)
        given = {Proposer.NGRAM: planned.options.ngram_tokens, Proposer.GRAMMAR: planned.options.forced_tokens}
        return Draft(k, given.get(planned.choice.proposer), planned.options.judged, follow, catch_up)

    def _advance(self, seq: Sequence, draft: Draft, planned: _Planned | None, new_ids: list[int], num_accepted: int,
                 logprobs: list[TokenLogprob] | None) -> RequestOutput:
        now = time.perf_counter()
        if seq.stats.first_token_time is None:
            seq.stats.first_token_time = now
        seq.stats.num_target_steps += 1
        proposer = planned.choice.proposer if planned and draft.tokens is not None else self.model_proposer
        if draft.k > 0:
            seq.stats.record_verify(proposer.value, draft.k, num_accepted)
        lookup = planned.options.ngram_tokens if planned else []  # scored even when the draft model ran
        self.planner.update(seq, Choice(proposer if draft.k else None, draft.k), num_accepted, new_ids, lookup)
        kept = self.stop_checker.append(seq, new_ids, logprobs)
        if seq.grammar is not None and not seq.grammar.advance(new_ids[:kept]):  # emitted tokens only
            seq.finish_reason, seq.error = "error", f"structured output: {seq.grammar.error}"
        self.block_manager.cache_full_blocks(seq)  # before a finish frees them: they stay reusable
        if seq.finish_reason:
            self._finish(seq)
        else:
            self.block_manager.truncate(seq.block_table, seq.num_target_cached)
        out = self._output(seq, new_ids[:kept], draft.k, min(num_accepted, kept))
        out.proposer = proposer.value if draft.k else None
        out.new_logprobs = None if logprobs is None else logprobs[:kept]
        return out

    def _finish(self, seq: Sequence) -> None:
        seq.stats.finish_time = time.perf_counter()
        self.scheduler.finish(seq, seq.finish_reason or "stop")
        self.seqs.pop(seq.request_id, None)

    def _fail(self, seq: Sequence, error: str) -> RequestOutput:
        seq.finish_reason, seq.error = "error", error
        self._finish(seq)
        return self._output(seq, [], 0, 0)

    def _output(self, seq: Sequence, new_ids: list[int], k: int, num_accepted: int) -> RequestOutput:
        if seq.is_finished:
            self.stop_checker.flush(seq)
        out = RequestOutput(seq.request_id, new_ids, seq.text.take(), seq.is_finished, seq.finish_reason, seq.error,
                            k, num_accepted)
        if seq.is_finished:
            out.text, out.token_ids = seq.output_text, seq.output_token_ids
            out.stats = seq.stats.summary(seq.num_output_tokens)
        return out

    # ---- conveniences ---------------------------------------------------------------------------

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Run prompts to completion; one final RequestOutput per prompt, in order (with `logprobs`: all of
        them, gathered from the steps' `new_logprobs`, as the engine keeps none)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        logprobs = {i: [] if sp.logprobs is not None else None for i, sp in zip(ids, params_list)}
        finals: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.new_logprobs:
                    logprobs[out.request_id].extend(out.new_logprobs)
                if out.finished:
                    out.logprobs, finals[out.request_id] = logprobs[out.request_id], out
        return [finals[i] for i in ids]

    def kv_usage(self) -> dict:
        """Pool occupancy, and how much of the reserved memory holds live tokens (both models)."""
        bm = self.block_manager
        bytes_per_token = self.kv_bytes // (bm.allocator.num_blocks * bm.block_size)
        return {
            "num_blocks": bm.allocator.num_blocks,
            "used_blocks": bm.num_used_blocks,
            "free_blocks": bm.num_free_blocks,
            "block_size": bm.block_size,
            "pool_bytes": self.kv_bytes,
            "bytes_per_token": bytes_per_token,
            "reserved_bytes": bm.num_used_blocks * bm.block_size * bytes_per_token,
            "live_tokens": bm.live_tokens(self.scheduler.running),
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "max_model_len": self.max_model_len,  # what a contiguous per-sequence cache would reserve
            **bm.prefix_cache_usage(),  # cached blocks (in use or free) and prefix-cache token counters
        }
