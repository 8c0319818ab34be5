"""Hypothesis drives request bodies (valid, out-of-range and wrongly typed fields) at a live app: every
answer must be a 2xx or a 4xx with a message, never a 5xx, and no KV blocks may leak."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve_harness import MODEL, app_args, build_test_app, local_serve, wait_kv_free

junk = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=2))
short_text = st.text(max_size=40)
numbers = st.one_of(st.integers(-3, 12), st.integers(), st.floats(allow_nan=False, allow_infinity=False), junk)
sampling = {
    "max_tokens": st.one_of(st.integers(-2, 8), st.integers(), junk),
    "temperature": st.one_of(st.floats(-1, 150, allow_nan=False), junk),
    "top_p": st.one_of(st.floats(-0.5, 1.5, allow_nan=False), junk),
    "top_k": numbers, "seed": numbers, "num_speculative_tokens": numbers,
    "timeout_s": st.one_of(st.floats(-1, 5, allow_nan=False), junk),
    "stop": st.one_of(short_text, st.lists(short_text, max_size=4), junk),
    "ignore_eos": st.one_of(st.booleans(), junk), "speculative": st.one_of(st.booleans(), junk),
}
prompt = st.one_of(short_text, st.just("   "), st.lists(short_text, max_size=6), junk)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]),
                                 "content": st.one_of(short_text, junk)})
model = st.sampled_from([MODEL, "gpt-4", ""])
BODIES = {
    "/generate": st.fixed_dictionaries({"prompt": prompt}, optional=sampling),
    "/generate/batch": st.fixed_dictionaries({"prompts": prompt}, optional=sampling),
    "/generate/stream": st.fixed_dictionaries({"prompt": prompt}, optional=sampling),
    "/v1/completions": st.fixed_dictionaries({"model": model, "prompt": prompt},
                                             optional={**sampling, "stream": st.booleans(), "n": numbers}),
    "/v1/chat/completions": st.fixed_dictionaries({"model": model, "messages": st.lists(message, max_size=3)},
                                                  optional={**sampling, "stream": st.booleans()}),
}
requests = st.sampled_from(sorted(BODIES)).flatmap(lambda route: st.tuples(st.just(route), BODIES[route]))


@pytest.fixture(scope="module")
def http(llama_pair):
    app = build_test_app(app_args(llama_pair), {"ray_actor_options": {"num_cpus": 0.5}})
    with local_serve(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests)
def test_no_request_body_gets_a_5xx(http, request):
    route, body = request
    response = http.post(route, json=body)
    assert response.status_code < 500, (route, body, response.text)
    if response.status_code >= 400:
        error = response.json()
        assert (error["error"]["message"] if route.startswith("/v1") else error["detail"]), error
    elif route.endswith("stream") or body.get("stream") is True:
        assert "data: [DONE]" in response.text and "event: error" not in response.text, (route, body)
        assert '"error": {' not in response.text, (route, body, response.text)


def test_no_blocks_leaked_after_fuzzing(http):
    assert wait_kv_free(http) == 0
