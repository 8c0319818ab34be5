"""End to end over HTTP: a real local Ray cluster serving the Helix graph on the tiny random pair — and, as a
second model of the same app, a tiny random Qwen2 target that the `model` field routes to."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch

from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams
from tests.serve_harness import CLUSTER, MODEL, PROMPT, app_args, build_test_app

pytestmark = pytest.mark.serving  # on the session's shared cluster (serve_harness.CLUSTER)

SECOND = "helix-test-qwen2"  # the app's second model: plain decoding on a tiny random Qwen2
RESERVED = min(os.sched_getaffinity(0))  # a core this machine lets us use


@pytest.fixture(scope="module")
def base_url(llama_pair, qwen2_pair):
    first = app_args(llama_pair, cpu_cores=[RESERVED])  # the first model's engine replica reserves a core
    max_batch_prompts = first.pop("max_batch_prompts")
    assert first.pop("served_model_name") == MODEL
    second = {"target_model": str(qwen2_pair[0]), "draft_model": None, "device": "cpu", "dtype": "float32",
              "num_kv_blocks": 64}
    args = {"models": {MODEL: first, SECOND: second}, "max_batch_prompts": max_batch_prompts}
    # Half a core each: two engines and the ingress fit the 2-CPU cluster.
    with CLUSTER.serving(build_test_app(args, {"ray_actor_options": {"num_cpus": 0.5}})) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def local_engine(llama_pair) -> Iterator[LLMEngine]:
    # The reference engine shares 2 cores with the replicas: one torch thread avoids oversubscription.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    target, draft = llama_pair
    yield LLMEngine(EngineConfig(str(target), str(draft), device="cpu", dtype="float32", num_kv_blocks=128))
    torch.set_num_threads(threads)


def _sse_events(response: httpx.Response) -> list[tuple[str, str]]:
    """(event, data) pairs of a Server-Sent Events body."""
    events, name, data = [], "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            events.append((name, "\n".join(data)))
            name, data = "message", []
    return events


def _kv_used(http: httpx.Client) -> int:
    return http.get("/health").json()["kv_cache"]["used_blocks"]


def test_ping_health_models_docs(http):
    assert http.get("/ping").json() == {"status": "ok"}
    health = http.get("/health").json()
    assert health["model_loaded"] and health["device"] == "cpu" and health["has_draft"]
    assert health["proposers"] == ["draft", "ngram", "grammar"] and health["eagle_head"] is None
    assert health["kv_cache"]["num_blocks"] == 128
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [MODEL, SECOND]
    assert health["served_model_name"] == MODEL and set(health["models"]) == {MODEL, SECOND}
    assert health["models"][SECOND]["proposers"] == ["ngram", "grammar"]
    # The reserved core holds the first model's engine thread; the second's (no cpu_cores) may run anywhere.
    assert [p["engine_thread_cores"] for p in health["pools"].values()] == [[RESERVED]]
    assert [p["engine_thread_cores"] for p in health["models"][SECOND]["pools"].values()] == [
        sorted(os.sched_getaffinity(0))]
    assert http.get("/docs").status_code == 200
    assert "/generate/stream" in http.get("/openapi.json").json()["paths"]


def test_generate_greedy_matches_local_engine(http, local_engine):
    response = http.post("/generate", json={"prompt": PROMPT, "max_tokens": 24})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"]
    body = response.json()
    (expected,) = local_engine.generate([PROMPT], SamplingParams(max_tokens=24))
    assert body["generated_text"] == expected.text
    assert body["tokens_generated"] == len(expected.token_ids) and body["finish_reason"] == expected.finish_reason
    assert body["num_drafted"] > 0 and 0 <= body["num_accepted"] <= body["num_drafted"]
    assert body["time_to_first_token"] > 0 and body["tokens_per_second"] > 0


def test_speculative_method_per_request_on_native_and_openai_routes(http, client, local_engine):
    """Prompt lookup only (K fixed so the planner's cost call cannot skip it): the stats say who drafted."""
    prompt = "the quick brown fox and the quick brown fox and the quick"
    (expected,) = local_engine.generate([prompt], SamplingParams(max_tokens=16, speculative=False))
    body = http.post("/generate", json={"prompt": prompt, "max_tokens": 16, "speculative_method": "ngram",
                                          "num_speculative_tokens": 4}).json()
    assert body["generated_text"] == expected.text
    assert body["by_proposer"]["ngram"]["num_drafted"] > 0 and "draft" not in body["by_proposer"]
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                           extra_body={"speculative_method": "ngram"})
    assert completion.choices[0].text == expected.text


def test_generate_batch(http, local_engine):
    prompts = [PROMPT, "paged attention reads", "def add(a, b):"]
    response = http.post("/generate/batch", json={"prompts": prompts, "max_tokens": 12, "speculative": False})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = local_engine.generate(prompts, SamplingParams(max_tokens=12, speculative=False))
    assert [r["generated_text"] for r in body["results"]] == [e.text for e in expected]
    assert all(r["num_drafted"] == 0 for r in body["results"])
    assert body["num_prompts"] == 3
    assert body["total_tokens_generated"] == sum(r["tokens_generated"] for r in body["results"])


def test_generate_stream_chunks_add_up_to_final(http, local_engine):
    payload = {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True, "num_speculative_tokens": 3}
    with http.stream("POST", "/generate/stream", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == ("message", "[DONE]")
    chunks = [json.loads(data) for name, data in events if name == "chunk"]
    (final,) = [json.loads(data) for name, data in events if name == "final"]
    assert len(chunks) > 1
    # a chunk may carry several engine steps (merged behind a slow reader): each step drafted at most K = 3
    assert all(c["num_accepted"] <= c["num_drafted"] == sum(c["step_ks"]) for c in chunks)
    assert all(k <= 3 for c in chunks for k in c["step_ks"])
    (expected,) = local_engine.generate([PROMPT], SamplingParams(max_tokens=40, ignore_eos=True))
    assert "".join(c["text"] for c in chunks) == expected.text
    assert [t for c in chunks for t in c["token_ids"]] == expected.token_ids
    assert final["tokens_generated"] == 40 and final["finish_reason"] == "length"


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_openai_completions(client, local_engine):
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    (expected,) = local_engine.generate([PROMPT], SamplingParams(max_tokens=10))
    assert completion.choices[0].text == expected.text
    assert completion.usage.completion_tokens == len(expected.token_ids)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == expected.text


def test_openai_chat_completions(client):
    messages = [{"role": "user", "content": "the quick brown"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_openai_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-nope", prompt=PROMPT, max_tokens=4)
    assert "gpt-nope" in info.value.body["message"]
    response = http.post("/generate", json={"prompt": PROMPT, "model": "gpt-nope"})
    assert response.status_code == 404 and SECOND in response.json()["detail"]


@pytest.fixture(scope="module")
def second_engine(qwen2_pair) -> Iterator[LLMEngine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLMEngine(EngineConfig(str(qwen2_pair[0]), None, device="cpu", dtype="float32", num_kv_blocks=64))
    torch.set_num_threads(threads)


def test_the_model_field_routes_to_that_models_engine(http, client, local_engine, second_engine):
    """Each route sends a request naming the second model to the second model's engine, and only there."""
    (mine,) = second_engine.generate([PROMPT], SamplingParams(max_tokens=12, speculative=False))
    (default,) = local_engine.generate([PROMPT], SamplingParams(max_tokens=12, speculative=False))
    assert mine.token_ids != default.token_ids  # else this test could not tell the models apart
    completion = client.completions.create(model=SECOND, prompt=PROMPT, max_tokens=12, temperature=0)
    assert (completion.model, completion.choices[0].text) == (SECOND, mine.text)
    chunks = list(client.completions.create(model=SECOND, prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == mine.text and chunks[0].model == SECOND
    native = http.post("/generate", json={"prompt": PROMPT, "max_tokens": 12, "model": SECOND}).json()
    batch = http.post("/generate/batch", json={"prompts": [PROMPT], "max_tokens": 12, "model": SECOND}).json()
    assert native["generated_text"] == batch["results"][0]["generated_text"] == mine.text
    assert http.post("/generate", json={"prompt": PROMPT, "max_tokens": 12}).json()["generated_text"] == \
        default.text  # no model: the first one


@pytest.mark.parametrize(("route", "payload", "status", "needle"), [
    ("/generate", {"prompt": "   "}, 422, "prompt must not be empty"),
    ("/generate", {"prompt": PROMPT, "max_tokens": 0}, 422, "max_tokens"),
    ("/generate", {"prompt": PROMPT, "max_tokens": 100_000}, 400, "max_tokens must be <"),
    ("/generate", {"prompt": PROMPT, "temperature": -1}, 422, "temperature"),
    ("/generate", {"prompt": PROMPT, "top_p": 1.5}, 422, "top_p"),
    ("/generate", {"prompt": PROMPT, "top_k": -2}, 422, "top_k"),
    ("/generate", {"prompt": PROMPT, "max_tokens": "ten"}, 422, "max_tokens"),
    ("/generate", {"prompt": 42}, 422, "prompt"),
    ("/generate", {"prompt": "fox " * 600}, 413, "context"),
    ("/generate", {"prompt": PROMPT, "num_speculative_tokens": 99}, 400, "num_speculative_tokens"),
    ("/generate", {"prompt": PROMPT, "speculative_method": "medusa"}, 422, "speculative_method"),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "speculative_method": "eagle"}, 400, "speculative_method"),
    ("/generate/batch", {"prompts": [PROMPT] * 5}, 413, "at most 4"),
    ("/generate/batch", {"prompts": [PROMPT, ""]}, 422, "prompts[1]"),
    ("/generate/stream", {"prompt": "fox " * 600}, 413, "context"),
    ("/v1/completions", {"model": MODEL, "prompt": "", "max_tokens": 4}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
])
def test_bad_input_is_a_clear_4xx(http, route, payload, status, needle):
    response = http.post(route, json=payload)
    assert response.status_code == status, response.text
    body = response.json()
    message = body["error"]["message"] if route.startswith("/v1") else body["detail"]
    assert needle in message


def test_short_request_overtakes_a_long_one(http, base_url):
    """Continuous batching: a 5-token request sent mid-way through a 300-token one finishes first."""
    finished: dict[str, float] = {}
    first_chunk = threading.Event()

    def run_long() -> None:
        payload = {"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}
        with httpx.Client(base_url=base_url, timeout=120) as long_client:
            with long_client.stream("POST", "/generate/stream", json=payload) as response:
                for line in response.iter_lines():
                    if line.startswith("event: chunk"):
                        first_chunk.set()
        finished["long"] = time.perf_counter()

    thread = threading.Thread(target=run_long)
    thread.start()
    assert first_chunk.wait(30)
    response = http.post("/generate", json={"prompt": "def add", "max_tokens": 5, "ignore_eos": True})
    finished["short"] = time.perf_counter()
    thread.join(120)
    assert response.json()["tokens_generated"] == 5
    assert finished["short"] < finished["long"]


def test_client_disconnect_aborts_and_frees_kv(http, base_url):
    # ~490 plain decoding steps take seconds; the blocks must come back long before that would end.
    payload = {"prompt": PROMPT, "max_tokens": 490, "ignore_eos": True, "speculative": False}
    with httpx.Client(base_url=base_url, timeout=60) as short_lived:
        with short_lived.stream("POST", "/generate/stream", json=payload) as response:
            # NOTE: keep the line iterator referenced: a dropped one closes the connection early.
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("event: chunk"))
            assert _kv_used(http) > 0
    deadline = time.monotonic() + 1.5
    while _kv_used(http) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _kv_used(http) == 0

