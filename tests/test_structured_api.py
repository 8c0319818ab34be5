"""Structured outputs over HTTP: OpenAI's response_format and vLLM's structured_outputs / guided_* fields through
the official `openai` client and the native /generate route; unknown and conflicting fields are 400s."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.schema_suite import SCHEMAS
from tests.serve_harness import MODEL, app_args, build_test_app, local_serve

SCHEMA = SCHEMAS["mixed_record"]


@pytest.fixture(scope="module")
def base_url(llama_pair):
    app = build_test_app(app_args(llama_pair), {"ray_actor_options": {"num_cpus": 0.5}})
    with local_serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as session:
        yield session


def test_chat_json_schema_response_format_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the quick"}],
                                           response_format=fmt, max_tokens=96, n=2, temperature=1.0, seed=3,
                                           user="someone", metadata={"k": "v"}, store=False)
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_completions_structured_outputs_choice_and_guided_regex(client):
    choices = ["yes", "no", "maybe later"]
    reply = client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=8,
                                      extra_body={"structured_outputs": {"choice": choices}})
    assert reply.choices[0].text in choices
    reply = client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=16, temperature=1.0,
                                      extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", reply.choices[0].text)


def test_streamed_json_object_is_one_json_object(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "def"}],
                                            response_format={"type": "json_object"}, max_tokens=64, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    text = "".join(parts)
    assert text.startswith("{") and len(parts) > 1


def test_native_generate_takes_the_same_fields(http):
    body = {"prompt": "the quick", "max_tokens": 96, "structured_outputs": {"json": SCHEMA}}
    reply = http.post("/generate", json=body)
    assert reply.status_code == 200, reply.text
    jsonschema.validate(json.loads(reply.json()["generated_text"]), SCHEMA)


@pytest.mark.parametrize(("body", "words"), [
    ({"structured_outputs": {"choice": ["a"]}, "guided_regex": "b"}, "structured_outputs.choice, guided_regex"),
    ({"response_format": {"type": "json_object"}, "guided_json": {"type": "integer"}}, "response_format, guided_json"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ({"structured_outputs": {"choice": ["a"], "unknown": 1}}, "unknown"),
    ({"guided_regex": "a(b"}, "unclosed group"),
    ({"guided_json": {"type": "objectx"}}, "objectx"),
    ({"guided_json": "{not json"}, "not valid JSON"),
    ({"guided_grammar": "start: missing_rule"}, "missing_rule"),
    ({"guided_choice": []}, "choice"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tool"),
])
def test_bad_or_conflicting_fields_are_400s_naming_them(http, body, words):
    for route, base in (("/v1/completions", {"model": MODEL, "prompt": "the"}),
                        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})):
        reply = http.post(route, json={**base, **body, "max_tokens": 4})
        assert reply.status_code == 400, (route, reply.text)
        assert words in reply.json()["error"]["message"], reply.text
