"""Continuous batching inside one replica: requests join the running sequences between engine steps.

The engine is synchronous and not thread-safe, so every call into it goes through one worker thread;
the asyncio side only routes outputs to per-request queues and never blocks on torch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from helix_serve.engine.llm_engine import LLMEngine, PromptTooLongError, RequestOutput, RequestRejectedError
from helix_serve.engine.logprobs import TokenLogprob
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.serving.prompting import prompt_token_ids
from helix_serve.serving.protocol import EngineChunk, EngineRequest, TokenLogprobs

logger = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_BACKOFF_S = 0.002  # when sequences wait for KV blocks, don't spin the engine thread
ENGINE_FAILURE_STATUS = 503  # the engine's failure, not the request's: the client may retry


@dataclass(slots=True)
class StepSummary:
    """What one engine step did, for metrics: each speculating sequence's proposer, K and accepted drafts,
    and KV usage after the step."""

    speculated: list[tuple[str, int, int]]  # (proposer, K, accepted)
    kv: dict[str, int]
    num_generated: int = 0  # tokens the step emitted, over every sequence

    @classmethod
    def of(cls, outputs: list[RequestOutput], kv: dict[str, int]) -> StepSummary:
        # NOTE: an output's num_drafted is the K its sequence used this step (0: prefill or plain decoding).
        return cls([(o.proposer, o.num_drafted, o.num_accepted) for o in outputs if o.num_drafted > 0], kv,
                   sum(len(o.new_token_ids) for o in outputs))

    @property
    def ks(self) -> list[int]:
        return [k for _, k, _ in self.speculated]

    @property
    def num_drafted(self) -> int:
        return sum(self.ks)

    @property
    def num_accepted(self) -> int:
        return sum(a for _, _, a in self.speculated)

    @property
    def mean_k(self) -> float:
        return self.num_drafted / len(self.ks) if self.ks else 0.0

    def info(self) -> dict[str, Any]:
        return {"mean_k": self.mean_k, "num_speculating": len(self.ks), "num_drafted": self.num_drafted,
                "num_accepted": self.num_accepted}


class StepLoop:
    """Owns the engine: admits batches of requests, steps, and streams each request's chunks."""

    def __init__(self, engine: LLMEngine, on_step: Callable[[StepSummary], None] | None = None):
        self.engine = engine
        self.last_step: StepSummary | None = None  # the last step that produced output
        self._on_step = on_step
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helix-engine")
        self._streams: dict[str, asyncio.Queue[EngineChunk]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def run_on_engine(self, fn: Callable[..., T], *args: Any) -> T:
        """The only way to touch the engine: queued behind (or between) steps on its thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def alive(self) -> bool:
        return self._task is None or not self._task.done()

    async def check_health(self, timeout_s: float) -> None:
        """Raise unless the step loop runs and the engine thread answers within `timeout_s` (a wedged
        step makes Serve replace the replica)."""
        if not self.alive:
            raise RuntimeError("the engine step loop has stopped")
        await asyncio.wait_for(self.run_on_engine(self.engine.kv_usage), timeout_s)

    def open(self, request_id: str) -> asyncio.Queue[EngineChunk]:
        """Register a stream before admission, so a caller that leaves early can be told apart."""
        if request_id in self._streams:
            raise DuplicateRequestError(f"request id {request_id!r} is already running")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="helix-step-loop")
        queue: asyncio.Queue[EngineChunk] = asyncio.Queue()
        self._streams[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        """The caller is gone: if its sequence still runs, abort it so its KV blocks return."""
        if self._streams.pop(request_id, None) is not None:
            self._executor.submit(self.engine.abort_request, request_id)

    async def admit(self, requests: list[EngineRequest]) -> None:
        """Add a batch to the engine in one engine-thread call; it joins at the next step."""
        waiting = [r for r in requests if r.request_id in self._streams]  # skip callers already gone
        await asyncio.to_thread(self._compile_constraints, waiting)
        admissions = await self.run_on_engine(self._add_all, waiting)
        for chunk in admissions:
            self._deliver(chunk)
        self._wakeup.set()

    def _compile_constraints(self, requests: list[EngineRequest]) -> None:
        """Compile structured-output constraints off the engine thread, so steps never wait on one: the
        engine's compile cache keeps them for admission (which refuses a bad one, with the reason)."""
        for request in requests:
            constraint = request.sampling.get("structured")
            if constraint is not None:
                try:
                    self.engine.grammars.compile(constraint)
                except ValueError:  # ConstraintError: reported when the engine admits it
                    pass

    def _add_all(self, requests: list[EngineRequest]) -> list[EngineChunk]:
        return [self._add(r) for r in requests]

    def _add(self, request: EngineRequest) -> EngineChunk:
        try:
            token_ids = prompt_token_ids(self.engine.tokenizer, request)
            params = SamplingParams(**self._sampling(request, len(token_ids)))
            self._check_lengths(params)
            self.engine.add_request(token_ids, params, request.request_id)
        except PromptTooLongError as exc:
            return EngineChunk(request.request_id, finished=True, error=str(exc), status_code=413)
        except (RequestRejectedError, ValueError, TypeError) as exc:
            return EngineChunk(request.request_id, finished=True, error=str(exc), status_code=400)
        except Exception as exc:  # noqa: BLE001 - fail this request only, not the rest of its batch
            logger.exception("could not admit request %s", request.request_id)
            return EngineChunk(request.request_id, finished=True, error=f"{type(exc).__name__}: {exc}",
                               status_code=500)
        return EngineChunk(request.request_id, num_prompt_tokens=len(token_ids))

    def _sampling(self, request: EngineRequest, num_prompt_tokens: int) -> dict[str, Any]:
        """The request's sampling settings, with max_tokens None ("up to the context") filled in."""
        sampling = dict(request.sampling)
        if sampling.get("max_tokens") is None:
            room = self.engine.max_new_tokens(num_prompt_tokens)
            sampling["max_tokens"] = min(room, request.max_tokens_limit or room)
        return sampling

    def _check_lengths(self, params: SamplingParams) -> None:
        context = self.engine.max_model_len
        if params.max_tokens >= context:
            raise ValueError(f"max_tokens must be < the model's context length ({context})")

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()  # cleared before stepping: an admit during the step sets it again
            try:
                outputs, busy, kv = await self.run_on_engine(self._step)
            except Exception as exc:  # noqa: BLE001 - one broken step must not leave callers waiting forever
                logger.exception("engine step loop failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")
                continue
            for output in outputs:
                self._deliver(chunk_from_output(output))
            if outputs:
                self._record(StepSummary.of(outputs, kv))
            if busy:
                self._wakeup.set()
                if not outputs:
                    await asyncio.sleep(IDLE_BACKOFF_S)

    def _step(self) -> tuple[list[RequestOutput], bool, dict[str, int]]:
        outputs = self.engine.step()
        return outputs, self.engine.has_unfinished_requests(), self.engine.kv_usage()

    def _record(self, step: StepSummary) -> None:
        self.last_step = step
        if self._on_step is not None:
            try:
                self._on_step(step)
            except Exception:  # noqa: BLE001 - metrics must never stop generation (nor flood the log)
                logger.exception("recording engine step metrics failed; no more step metrics from this replica")
                self._on_step = None

    def _deliver(self, chunk: EngineChunk) -> None:
        queue = self._streams.get(chunk.request_id)
        if queue is None:
            return  # its caller left; the abort is already queued on the engine thread
        if chunk.finished:
            del self._streams[chunk.request_id]
        queue.put_nowait(chunk)

    def _fail_all(self, error: str) -> None:
        """The step loop broke: every caller gets a final 503 chunk now. For a caller still waiting for its
        admission that chunk is a refusal (its status code), never mistaken for an admission."""
        for request_id in list(self._streams):
            self._deliver(EngineChunk(request_id, finished=True, finish_reason="error",
                                      error=f"the engine's step loop failed: {error}",
                                      status_code=ENGINE_FAILURE_STATUS))
            self._executor.submit(self.engine.abort_request, request_id)


class DuplicateRequestError(ValueError):
    """A request id that is still streaming (HTTP 409)."""


async def coalesced(queue: asyncio.Queue[EngineChunk]) -> AsyncIterator[EngineChunk]:
    """A request's stream from its queue: the admission chunk and the first tokens alone (the caller reads the
    admission apart, and times the first token), then each chunk merged with those already waiting behind it, so
    a consumer slower than the engine gets fewer, larger messages instead of a backlog."""
    for _ in range(2):
        chunk = await queue.get()
        yield chunk
        if chunk.finished:
            return
    while not chunk.finished:
        chunk = await queue.get()
        while not chunk.finished and not queue.empty():
            later = queue.get_nowait()
            if later.error is not None:  # an error travels alone, after the tokens that came before it
                yield chunk
                chunk = later
                break
            chunk.absorb(later)
        yield chunk


def chunk_from_output(output: RequestOutput) -> EngineChunk:
    logprobs = None if output.new_logprobs is None else token_logprobs(output.new_logprobs)
    return EngineChunk(
        request_id=output.request_id, text=output.new_text, token_ids=list(output.new_token_ids),
        num_drafted=output.num_drafted, num_accepted=output.num_accepted,
        step_ks=[output.num_drafted] if output.num_drafted else [], finished=output.finished,
        finish_reason=output.finish_reason, error=output.error, stats=output.stats, logprobs=logprobs,
    )


def token_logprobs(logprobs: list[TokenLogprob]) -> list[TokenLogprobs]:
    """Engine logprobs in the protocol's shape. Their token texts were made on the engine thread, in the
    context of the output (engine/logprobs.py); the tokenizer is not thread-safe and never runs here."""
    return [TokenLogprobs(lp.token, lp.token_id, lp.logprob, [(t, v) for t, (_, v) in zip(lp.top_tokens, lp.top)])
            for lp in logprobs]
