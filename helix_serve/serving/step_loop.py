"""Continuous batching inside one replica: requests join the running sequences between engine steps.

The engine is synchronous and not thread-safe, so one engine thread owns it: while there is work it runs the
calls queued for it between steps, steps back to back, and hands outputs to the event loop, which only routes
them to per-request queues and never blocks on torch. Outputs are handed over at most every `stream_interval_s`
(a request's admission, its first tokens and its end at once): each hand-over wakes the event loop and sends a
message through Ray, work that shares the engine's cores.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
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

    def __init__(self, engine: LLMEngine, on_step: Callable[[StepSummary], None] | None = None,
                 stream_interval_s: float = 0.0):
        self.engine = engine
        self.last_step: StepSummary | None = None  # the last step that produced output
        self.stream_interval_s = stream_interval_s  # read by the engine thread; set from the event loop
        self._on_step = on_step
        self._streams: dict[str, asyncio.Queue[EngineChunk]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helix-engine")
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._driving = False  # whether `_drive` runs or is submitted (under `_driving_lock`)
        self._driving_lock = threading.Lock()
        self._broken: str | None = None  # why the engine thread stopped for good, if it did
        # The engine thread's own: the requests it admitted that still run, those with no tokens out yet, and
        # outputs not yet handed over.
        self._running: set[str] = set()
        self._awaiting_first: set[str] = set()
        self._outbox: list[EngineChunk] = []
        self._summaries: list[StepSummary] = []
        self._handed_over_at = 0.0

    # ---- the event loop's side ----

    async def run_on_engine(self, fn: Callable[..., T], *args: Any) -> T:
        """The only way to touch the engine: run on its thread between steps."""
        self._loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = self._loop.create_future()

        def job() -> None:
            try:
                result = fn(*args)
            except Exception as exc:  # noqa: BLE001 - the caller gets it
                self._call_soon(_settle, future, None, exc)
            else:
                self._call_soon(_settle, future, result, None)

        self._submit(job)
        return await future

    async def check_health(self, timeout_s: float) -> None:
        """Raise unless the engine thread answers within `timeout_s` (a wedged step makes Serve replace the
        replica)."""
        if self._broken is not None:
            raise RuntimeError(f"the engine thread has stopped: {self._broken}")
        await asyncio.wait_for(self.run_on_engine(self.engine.kv_usage), timeout_s)

    def open(self, request_id: str) -> asyncio.Queue[EngineChunk]:
        """Register a stream before admission, so a caller that leaves early can be told apart."""
        if request_id in self._streams:
            raise DuplicateRequestError(f"request id {request_id!r} is already running")
        self._loop = asyncio.get_running_loop()
        stream: asyncio.Queue[EngineChunk] = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def close(self, request_id: str) -> None:
        """The caller is gone: if its sequence still runs, abort it so its KV blocks return."""
        if self._streams.pop(request_id, None) is not None:
            self._submit(lambda: self._abort(request_id))

    async def admit(self, requests: list[EngineRequest]) -> None:
        """Add a batch to the engine in one engine-thread call; it joins at the next step. The admission chunks
        reach the streams before any of their tokens."""
        waiting = [r for r in requests if r.request_id in self._streams]  # skip callers already gone
        if any(r.sampling.get("structured") is not None for r in waiting):
            await asyncio.to_thread(self._compile_constraints, waiting)
            waiting = [r for r in waiting if r.request_id in self._streams]  # and those gone meanwhile
        await self.run_on_engine(self._add_all, waiting)

    def _receive(self, chunks: list[EngineChunk], steps: list[StepSummary]) -> None:
        for chunk in chunks:
            self._deliver(chunk)
        for step in steps:
            self._record(step)

    def _record(self, step: StepSummary) -> None:
        self.last_step = step
        if self._on_step is not None:
            try:
                self._on_step(step)
            except Exception:  # noqa: BLE001 - metrics must never stop generation (nor flood the log)
                logger.exception("recording engine step metrics failed; no more step metrics from this replica")
                self._on_step = None

    def _deliver(self, chunk: EngineChunk) -> None:
        stream = self._streams.get(chunk.request_id)
        if stream is None:
            return  # its caller left; the abort is already queued on the engine thread
        if chunk.finished:
            del self._streams[chunk.request_id]
        stream.put_nowait(chunk)

    def _fail_all(self, error: str) -> None:
        """A step failed (or the engine thread stopped): every caller gets a final 503 chunk now. For a caller
        still waiting for its admission that chunk is a refusal (its status code), never mistaken for an admission."""
        for request_id in list(self._streams):
            self._deliver(EngineChunk(request_id, finished=True, finish_reason="error",
                                      error=f"the engine's step loop failed: {error}",
                                      status_code=ENGINE_FAILURE_STATUS))
            self._submit(lambda request_id=request_id: self._abort(request_id))

    # ---- the engine thread's side ----

    def _submit(self, job: Callable[[], None]) -> None:
        """Queue a call for the engine thread, and start driving the engine if it is idle."""
        self._jobs.put(job)
        with self._driving_lock:
            if not self._driving:
                self._driving = True
                self._executor.submit(self._drive)

    def _drive(self) -> None:
        """Run the queued calls, and step while this loop's requests run, handing outputs over; return when
        there is nothing left to do (a later `_submit` drives again)."""
        try:
            self._drive_until_idle()
        except BaseException as exc:  # a bug outside a step or a call: nothing runs here again, say so
            logger.exception("the engine thread stopped")
            self._broken = f"{type(exc).__name__}: {exc}"
            self._call_soon(self._fail_all, self._broken)
            raise

    def _drive_until_idle(self) -> None:
        while True:
            self._run_jobs()
            if not (self._running and self.engine.has_unfinished_requests()):
                self._running.clear()
                self._awaiting_first.clear()
                self._hand_over()
                with self._driving_lock:
                    if self._jobs.empty():
                        self._driving = False
                        return
                continue
            try:
                outputs, kv = self._step()
                self._collect(outputs, kv)
            except Exception as exc:  # noqa: BLE001 - one broken step must not leave callers waiting forever
                logger.exception("engine step loop failed")
                self._running.clear()  # not stepped again: `_fail_all` aborts them
                self._hand_over()  # the tokens before the failure go first
                self._call_soon(self._fail_all, f"{type(exc).__name__}: {exc}")
                continue
            if not outputs:  # sequences wait for KV blocks: wait a little, or for a call
                self._hand_over()
                try:
                    self._run(self._jobs.get(timeout=IDLE_BACKOFF_S))
                except queue.Empty:
                    pass

    def _run_jobs(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            self._run(job)

    @staticmethod
    def _run(job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:  # noqa: BLE001 - e.g. an abort that failed: the engine thread must keep going
            logger.exception("a call on the engine thread failed")

    def _step(self) -> tuple[list[RequestOutput], dict[str, int]]:
        return self.engine.step(), self.engine.kv_usage()

    def _collect(self, outputs: list[RequestOutput], kv: dict[str, int]) -> None:
        """Queue a step's chunks; hand them over now if one ends a stream or starts one's tokens (the time to the
        first token is not delayed), or the last hand-over was `stream_interval_s` ago."""
        urgent = False
        for output in outputs:
            chunk = chunk_from_output(output)
            if chunk.finished or (chunk.token_ids and output.request_id in self._awaiting_first):
                urgent = True
                self._awaiting_first.discard(output.request_id)
            if chunk.finished:
                self._running.discard(output.request_id)
            self._outbox.append(chunk)
        if outputs:
            self._summaries.append(StepSummary.of(outputs, kv))
        if urgent or time.monotonic() - self._handed_over_at >= self.stream_interval_s:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._outbox or self._summaries:
            self._call_soon(self._receive, self._outbox, self._summaries)
            self._outbox, self._summaries = [], []
        self._handed_over_at = time.monotonic()

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop has closed (its owner is gone): nobody is left to tell
            pass

    def _abort(self, request_id: str) -> None:
        """Stop a request; drop its held chunks too (a new request may reuse its id once its stream closed)."""
        self._running.discard(request_id)
        self._awaiting_first.discard(request_id)
        self._outbox = [chunk for chunk in self._outbox if chunk.request_id != request_id]
        self.engine.abort_request(request_id)

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

    def _add_all(self, requests: list[EngineRequest]) -> None:
        """Admit a batch; its admission chunks are handed over before anything a later step emits."""
        self._call_soon(self._receive, [self._add(r) for r in requests], [])

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
        self._running.add(request.request_id)
        self._awaiting_first.add(request.request_id)
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


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.cancelled():  # its caller stopped waiting (e.g. a health check's timeout)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DuplicateRequestError(ValueError):
    """A request id that is still streaming (HTTP 409)."""


async def batched(queue: asyncio.Queue[EngineChunk]) -> AsyncIterator[list[EngineChunk]]:
    """A request's stream from its queue, as messages: each is every chunk waiting, in order (the steps of one
    hand-over, or the backlog a slow consumer left), so the stream crosses Ray once per hand-over while each chunk
    stays one engine step. Ends with the message that holds the finished chunk."""
    while True:
        batch = [await queue.get()]
        while not batch[-1].finished and not queue.empty():
            batch.append(queue.get_nowait())
        yield batch
        if batch[-1].finished:
            return


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
