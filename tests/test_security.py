"""API keys and request limits over HTTP, against a real local Serve app with keys configured."""

from __future__ import annotations

import glob
import os

import httpx
import openai
import pytest

from tests.serve_harness import CLUSTER, MODEL, PROMPT, app_args, build_test_app, local_serve, wait_kv_free

pytestmark = pytest.mark.own_cluster  # its keys in the cluster's environment: runs last, on a cluster of its own

ENV_KEY = "env-key-7c1e9a0d4f"
FILE_KEY = "file-key-93b2f6e1aa"
WRONG = {"Authorization": "Bearer not-a-key"}
LIMITS = {"max_body_bytes": 4096, "max_prompt_chars": 200, "max_tokens": 64, "max_stop_strings": 2,
          "max_stop_chars": 8}
PROTECTED = [  # route, body
    ("/generate", {"prompt": PROMPT, "max_tokens": 2}),
    ("/generate/batch", {"prompts": [PROMPT], "max_tokens": 2}),
    ("/generate/stream", {"prompt": PROMPT, "max_tokens": 2}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}),
]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def session(llama_pair, tmp_path_factory):
    """(base URL, Ray logs dir) of an app whose keys come from $HELIX_API_KEYS and from a file."""
    import ray

    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# Helix API keys\n{FILE_KEY}\n")
    security = {"api_keys_file": str(keys_file), "metrics_require_key": True, "limits": LIMITS}
    app = build_test_app(app_args(llama_pair, security=security), {"ray_actor_options": {"num_cpus": 0.5}})
    # $HELIX_API_KEYS in the server's environment, as an operator sets it (a runtime_env would put it in Ray's logs)
    CLUSTER.stop()
    with local_serve(app, env={"HELIX_API_KEYS": f" {ENV_KEY} ,"}) as base_url:
        yield base_url, ray._private.worker._global_node.get_logs_dir_path()


@pytest.fixture(scope="module")
def http(session):
    with httpx.Client(base_url=session[0], timeout=60) as client:
        yield client


@pytest.mark.parametrize(("route", "body"), PROTECTED)
def test_generation_routes_need_a_valid_key(http, route, body):
    for headers in ({}, WRONG, {"Authorization": ENV_KEY}, {"Authorization": "Basic " + FILE_KEY}):
        response = http.post(route, json=body, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        if route.startswith("/v1"):
            assert response.json()["error"]["code"] == 401
        else:
            assert "API key" in response.json()["detail"]
    for key in (ENV_KEY, FILE_KEY):
        assert http.post(route, json=body, headers=auth(key)).status_code == 200


def test_open_and_configurable_routes(http):
    for path in ("/ping", "/health", "/", "/static/playground.js", "/openapi.json"):
        assert http.get(path).status_code == 200, path
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models", headers=auth(FILE_KEY)).status_code == 200
    assert http.get("/metrics").status_code == 401  # metrics_require_key: true
    assert http.get("/metrics", headers=auth(ENV_KEY)).status_code == 200


def test_openai_client_gets_authentication_error(session):
    base_url = session[0]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=FILE_KEY, max_retries=0)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].finish_reason


def test_no_permissive_cors(http):
    headers = {**auth(ENV_KEY), "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in http.options("/generate", headers=headers).headers
    response = http.post("/generate", json={"prompt": PROMPT, "max_tokens": 2}, headers=headers)
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize(("route", "body", "status", "needle"), [
    ("/generate", {"prompt": "x" * 201}, 413, "at most 200"),
    ("/generate/stream", {"prompt": "x" * 201}, 413, "at most 200"),
    ("/generate/batch", {"prompts": [PROMPT, "y" * 300]}, 413, "prompts[1]"),
    ("/generate/batch", {"prompts": [PROMPT] * 5}, 413, "at most 4"),
    ("/generate", {"prompt": PROMPT, "max_tokens": 65}, 422, "at most 64"),
    ("/generate", {"prompt": PROMPT, "stop": ["a", "b", "c"]}, 422, "at most 2"),
    ("/generate", {"prompt": PROMPT, "stop": ["long stop"]}, 422, "at most 8 characters"),
    ("/v1/completions", {"model": MODEL, "prompt": [PROMPT] * 5}, 413, "at most 4"),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000}, 400, "at most 64"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "z" * 150}] * 2}, 413,
     "at most 200"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 99}, 400, "at most 64"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "z" * 150}, {"type": "text", "text": "z" * 60}]}]}, 413, "at most 200"),
])
def test_limits_answer_before_the_engine(http, route, body, status, needle):
    response = http.post(route, json=body, headers=auth(FILE_KEY))
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"] if route.startswith("/v1") else response.json()["detail"]
    assert needle in message
    assert http.get("/health").json()["kv_cache"]["num_running"] == 0


def test_chat_default_max_tokens_is_the_configured_limit(http):
    """Without max_tokens a chat generates up to the context (512 here), but never past limits.max_tokens."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "ignore_eos": True}
    response = http.post("/v1/chat/completions", json=body, headers=auth(FILE_KEY))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == LIMITS["max_tokens"]
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_oversized_body_is_413(http):
    body = b'{"prompt": "' + b"x" * 5000 + b'"}'
    response = http.post("/generate", content=body, headers={**auth(FILE_KEY), "Content-Type": "application/json"})
    assert response.status_code == 413 and "at most 4096" in response.json()["detail"]

    def chunked():  # no Content-Length: the middleware must count what arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = http.post("/generate", content=chunked(), headers=auth(FILE_KEY))
    assert response.status_code == 413 and "over 4096 bytes" in response.json()["detail"]


def test_keys_never_logged(http, session):
    assert wait_kv_free(http) == 0
    files = [p for p in glob.glob(os.path.join(session[1], "**", "*"), recursive=True) if os.path.isfile(p)]
    assert files
    for path in files:
        with open(path, "rb") as log:
            content = log.read()
        assert ENV_KEY.encode() not in content and FILE_KEY.encode() not in content, path
