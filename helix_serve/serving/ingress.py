"""The FastAPI ingress deployment: validates, routes to the engine through a handle, formats replies.

It holds no model and imports no torch; prompts (and chat templates) are tokenized by the engine.
"""

# NOTE: no `from __future__ import annotations`: FastAPI must resolve the route signatures at runtime.
import asyncio
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle
from sse_starlette import EventSourceResponse

from helix_serve.serving import cpu_affinity, openai_format, sse_streams
from helix_serve.serving.app_config import RoutingConfig
from helix_serve.serving.auth import ApiKeyMiddleware
from helix_serve.serving.engine_client import EngineClient, EngineRejectedError, Generation
from helix_serve.serving.errors import GenerationFailedError, OpenAIError, install_error_handlers
from helix_serve.serving.limits import RequestLimitMiddleware
from helix_serve.serving.metrics import HelixMetrics, RequestObserverMiddleware
from helix_serve.serving.playground import playground_router
from helix_serve.serving.protocol import EngineRequest
from helix_serve.serving.schemas import (BatchGenerateRequest, BatchGenerateResponse, ChatCompletionRequest,
                                         CompletionRequest, GenerateRequest, GenerateResponse,
                                         OpenAISamplingFields, TokenLogprob)
from helix_serve.serving.security import Guard, SecurityConfig

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
# Chat has none: OpenAI generates up to the context. The engine fills that in (EngineRequest.max_tokens_limit).
CHAT_DEFAULT_MAX_TOKENS = None
METRICS = HelixMetrics()  # one per ingress process, shared with the middleware
GUARD = Guard()  # API keys and limits, configured when the replica starts

app = FastAPI(title="Helix", description="Speculative-decoding LLM inference server")
app.add_middleware(RequestLimitMiddleware, guard=GUARD)
app.add_middleware(ApiKeyMiddleware, guard=GUARD)  # outside the limits: nothing is read before the key check
# outermost: 401s and 413s are counted too, and every generation request gets its log line
app.add_middleware(RequestObserverMiddleware, metrics=METRICS)
install_error_handlers(app)
app.include_router(playground_router)


def request_id(request: Request) -> str:
    """Serve's proxy puts an X-Request-ID on every request (and echoes it on the response); the observer
    middleware adds one where it is missing, so the log line and the engine use the same id."""
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def generate_response(generation: Generation, logprobs: bool = False) -> GenerateResponse:
    if generation.finish_reason == "error":
        raise GenerationFailedError(generation.error, generation.status_code)
    s = generation.stats
    return GenerateResponse(
        request_id=generation.request_id, generated_text=generation.text, finish_reason=generation.finish_reason,
        num_prompt_tokens=generation.num_prompt_tokens, tokens_generated=s["tokens_generated"],
        time_seconds=s["time_seconds"], tokens_per_second=s["tokens_per_second"],
        time_to_first_token=s["time_to_first_token"], num_drafted=s["num_drafted"], num_accepted=s["num_accepted"],
        acceptance_rate=s["acceptance_rate"], mean_accepted_length=s["mean_accepted_length"],
        per_position_acceptance=s["per_position_acceptance"], by_proposer=s["by_proposer"],
        num_preemptions=s["num_preemptions"],
        logprobs=[TokenLogprob.of(lp) for lp in generation.logprobs] if logprobs else None,
    )


def choice_requests(base: str, sampling: dict[str, Any], n: int, prompts: list[dict[str, Any]]) -> list[EngineRequest]:
    """n generations per prompt, choice i of prompt p at index p × n + i (OpenAI's order). With a seed,
    choice i samples with seed + i, so each choice is reproducible on its own."""
    requests = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            seed = sampling.get("seed")
            fields = sampling if seed is None else {**sampling, "seed": seed + i}
            request_id = base if len(prompts) * n == 1 else f"{base}.{p * n + i}"
            requests.append(EngineRequest(request_id, fields, **prompt, choice=i))
    return requests


def summed_kv(infos) -> dict[str, int]:
    """The KV gauges' view over every served model's pools."""
    # NOTE: above the class: @serve.ingress captures the class and the globals its methods use when it is defined.
    keys = ("used_blocks", "free_blocks", "cached_blocks")
    return {key: sum(info["kv_cache"].get(key, 0) for info in infos) for key in keys}


@serve.deployment(name="HelixIngress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(app)
class HelixIngress:
    def __init__(self, engines: dict[str, dict[str, DeploymentHandle]], capacities: dict[str, float],
                 routing: RoutingConfig, max_batch_prompts: int, security: SecurityConfig | None = None,
                 reserved_cores: list[int] | None = None):
        """engines: served model name → its pools' handles by deployment name (the first model is the default of
        requests that name none); capacities: by deployment name; reserved_cores: the engines' `cpu_cores`, which
        this replica keeps off."""
        cpu_affinity.keep_off(reserved_cores or ())
        GUARD.configure(security or SecurityConfig(), max_batch_prompts)
        self.engines = {model: EngineClient.for_pools(pools, capacities, routing, METRICS)
                        for model, pools in engines.items()}
        self.default_model = next(iter(engines))
        self.max_batch_prompts = max_batch_prompts
        self.created = int(time.time())

    def engine(self, model: str | None) -> EngineClient:
        """The engine serving `model` (None: the default model); an unknown model is a 404."""
        client = self.engines.get(model or self.default_model)
        if client is None:
            raise HTTPException(404, f"the model {model!r} does not exist; served: {', '.join(self.engines)}")
        return client

    # ---- native routes --------------------------------------------------------------------------

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateRequest, request: Request) -> GenerateResponse:
        engine_request = EngineRequest(request_id(request), body.sampling(), **body.engine_prompt())
        generation = await self.engine(body.model).generate(engine_request, "/generate")
        return generate_response(generation, body.logprobs is not None)

    @app.post("/generate/batch", response_model=BatchGenerateResponse)
    async def generate_batch(self, body: BatchGenerateRequest, request: Request) -> BatchGenerateResponse:
        if len(body.prompts) > self.max_batch_prompts:
            raise HTTPException(413, f"{len(body.prompts)} prompts; at most {self.max_batch_prompts} per batch")
        engine = self.engine(body.model)
        started = time.perf_counter()
        base = request_id(request)
        requests = [EngineRequest(f"{base}.{i}", body.sampling(), prompt=p) for i, p in enumerate(body.prompts)]
        generations = await self._generate_all(engine, requests, "/generate/batch")
        results = [generate_response(g, body.logprobs is not None) for g in generations]
        elapsed = time.perf_counter() - started
        total = sum(r.tokens_generated for r in results)
        return BatchGenerateResponse(results=results, num_prompts=len(results), total_tokens_generated=total,
                                     time_seconds=elapsed, tokens_per_second=total / elapsed if elapsed else 0.0)

    @app.post("/generate/stream")
    async def generate_stream(self, body: GenerateRequest, request: Request) -> EventSourceResponse:
        engine_request = EngineRequest(request_id(request), body.sampling(), **body.engine_prompt())
        stream = await sse_streams.started(await self.engine(body.model).open(engine_request, "/generate/stream"))
        return EventSourceResponse(sse_streams.native_events(stream))

    @staticmethod
    async def _generate_all(engine: EngineClient, requests: list[EngineRequest], route: str) -> list[Generation]:
        """Concurrently, so the engine's @serve.batch admits them together; one rejection cancels the rest."""
        async def one(index: int, engine_request: EngineRequest) -> Generation:
            try:
                return await engine.generate(engine_request, route)
            except EngineRejectedError as exc:
                if len(requests) == 1:
                    raise
                raise EngineRejectedError(exc.status_code, f"generation {index}: {exc.message}") from exc

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i, r)) for i, r in enumerate(requests)]
        except* EngineRejectedError as errors:
            raise errors.exceptions[0] from None
        return [t.result() for t in tasks]

    # ---- OpenAI-compatible routes ---------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return openai_format.models_list(list(self.engines), self.created)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        engine, base, created = self._openai_request(body, request, len(body.prompts))
        sampling = body.sampling(COMPLETIONS_DEFAULT_MAX_TOKENS)
        requests = choice_requests(base, sampling, body.n, [{"prompt": p} for p in body.prompts])
        response_id, logprobs = f"cmpl-{base}", body.logprobs is not None
        if body.stream:
            streams = await self._open_all(engine, requests, "/v1/completions")
            shapes = openai_format.CompletionChunks(response_id, body.model, created, logprobs)
            return EventSourceResponse(sse_streams.openai_events(streams, body.n, shapes, body.include_usage))
        generations = self._check_generations(await self._generate_all(engine, requests, "/v1/completions"))
        return openai_format.completion(response_id, body.model, created, generations, body.n, logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        engine, base, created = self._openai_request(body, request, 1)
        messages = {"messages": [m.engine_message() for m in body.messages],
                    "max_tokens_limit": GUARD.limits.max_tokens}
        requests = choice_requests(base, body.sampling(CHAT_DEFAULT_MAX_TOKENS), body.n, [messages])
        response_id = f"chatcmpl-{base}"
        if body.stream:
            streams = await self._open_all(engine, requests, "/v1/chat/completions")
            chunks = openai_format.ToolCallChunks if body.calls_tool else openai_format.ChatChunks
            shapes = chunks(response_id, body.model, created, body.logprobs)
            return EventSourceResponse(sse_streams.openai_events(streams, body.n, shapes, body.include_usage))
        generations = self._check_generations(await self._generate_all(engine, requests, "/v1/chat/completions"))
        return openai_format.chat_completion(response_id, body.model, created, generations, body.logprobs,
                                             body.calls_tool)

    def _openai_request(self, body: OpenAISamplingFields, request: Request,
                        num_prompts: int) -> tuple[EngineClient, str, int]:
        """The engine of the request's model, its id and creation time, once its model and number of generations
        are known to be fine."""
        engine = self.engines.get(body.model)
        if engine is None:
            raise OpenAIError(404, f"The model `{body.model}` does not exist.", "NotFoundError", "model")
        if num_prompts * body.n > self.max_batch_prompts:
            raise OpenAIError(400, f"{num_prompts} prompt(s) × n={body.n} generations; at most "
                                   f"{self.max_batch_prompts} per request", "invalid_request_error", "n")
        return engine, request_id(request), int(time.time())

    @staticmethod
    async def _open_all(engine: EngineClient, requests: list[EngineRequest],
                        route: str) -> list[sse_streams.StartedStream]:
        """Every choice's stream, each past its first output; if one fails, the others are aborted."""
        async def one(engine_request: EngineRequest) -> sse_streams.StartedStream:
            return await sse_streams.started(await engine.open(engine_request, route))

        results = await asyncio.gather(*(one(r) for r in requests), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await asyncio.gather(*(r.aclose() for r in results if not isinstance(r, BaseException)))
            raise failures[0]
        return results

    @staticmethod
    def _check_generations(generations: list[Generation]) -> list[Generation]:
        for g in generations:
            if g.finish_reason == "error":
                raise GenerationFailedError(g.error, g.status_code)
        return generations

    # ---- operations -----------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        """Asks every model's engine pools: model loaded, device, KV pool usage. The top level is the default
        model's; with several models, `models` has each one's (a model none of whose pools answers is down)."""
        answers = await asyncio.gather(*(asyncio.wait_for(e.info(), timeout=10) for e in self.engines.values()),
                                       return_exceptions=True)
        infos = dict(zip(self.engines, answers))
        down = {m: a for m, a in infos.items() if isinstance(a, BaseException)}
        if self.default_model in down:  # any failure to reach the default model's engine means unhealthy
            exc = down[self.default_model]
            raise HTTPException(503, f"engine unavailable: {type(exc).__name__}: {exc}")
        live = {m: a for m, a in infos.items() if m not in down}
        METRICS.set_kv_usage(summed_kv(live.values()))
        health = {"status": "ok", "model_loaded": True, "served_model_name": self.default_model,
                  **live[self.default_model]}
        if len(self.engines) > 1:
            health["models"] = {m: live.get(m) or {"status": "down", "error": f"{type(a).__name__}: {a}"}
                                for m, a in infos.items()}
            if down:
                health["status"] = "degraded"
        return health

    @app.get("/ping")
    async def ping(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(self) -> Response:
        try:  # refresh the KV gauges; a busy or unreachable engine must not break scraping
            infos = await asyncio.gather(*(asyncio.wait_for(e.info(), timeout=2) for e in self.engines.values()))
            METRICS.set_kv_usage(summed_kv(infos))
        except Exception:  # noqa: BLE001
            pass
        return Response(METRICS.render(), media_type=CONTENT_TYPE_LATEST)
