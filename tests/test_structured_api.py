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
from tests.serve_harness import CLUSTER, MODEL, app_args, build_test_app

pytestmark = pytest.mark.serving  # on the session's shared cluster (serve_harness.CLUSTER)

SCHEMA = SCHEMAS["mixed_record"]


@pytest.fixture(scope="module")
def base_url(llama_pair):
    app = build_test_app(app_args(llama_pair), {"ray_actor_options": {"num_cpus": 0.5}})
    with CLUSTER.serving(app) as url:
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


# ---- tool calls (tool_choice "required" or a named function) ----------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "find a person",
                                           "parameters": SCHEMAS["flat_object"]}},
         {"type": "function", "function": {"name": "record_2", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "ping"}}]  # no parameters: an empty object
PARAMETERS = {"lookup": SCHEMAS["flat_object"], "record_2": SCHEMA,
              "ping": {"type": "object", "properties": {}, "additionalProperties": False}}
NAMED = {"type": "function", "function": {"name": "record_2"}}
USER = [{"role": "user", "content": "the quick"}]


def assert_valid_call(name: str, arguments: str, call_id: str) -> None:
    assert call_id.startswith("call_") and len(call_id) > len("call_")
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def test_required_tool_call_is_a_valid_call_of_a_tool(client):
    reply = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                           max_tokens=128, n=4, temperature=1.0, seed=11, parallel_tool_calls=False)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name in PARAMETERS
        assert_valid_call(call.function.name, call.function.arguments, call.id)
    assert len({c.message.tool_calls[0].id for c in reply.choices}) == 4


def test_named_tool_choice_calls_that_function(client):
    reply = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=NAMED,
                                           max_tokens=128, temperature=1.0, seed=5)
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "record_2"
    assert_valid_call("record_2", call.function.arguments, call.id)


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
def test_streamed_tool_call_comes_as_openai_streams_it(client, tool_choice):
    stream = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=tool_choice,
                                            max_tokens=128, temperature=1.0, seed=7, stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    assert deltas[0].delta.role == "assistant" and deltas[0].delta.content is None
    calls = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    head, pieces = calls[0], calls[1:]
    # the head: index, id, type, the name and empty arguments; then pieces of the arguments only
    assert head.index == 0 and head.type == "function" and head.function.arguments == ""
    assert len(pieces) > 1 and all(p.index == 0 and p.id is None and p.function.name is None for p in pieces)
    assert [d.finish_reason for d in deltas].count("tool_calls") == 1 and deltas[-1].finish_reason == "tool_calls"
    assert all(d.delta.content is None for d in deltas)
    assert head.function.name == "record_2" if tool_choice == NAMED else head.function.name in PARAMETERS
    assert_valid_call(head.function.name, "".join(p.function.arguments for p in pieces), head.id)


def test_tool_choice_none_ignores_the_tools(client):
    reply = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none",
                                           max_tokens=4)
    assert reply.choices[0].message.tool_calls is None and isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")


BAD_PARAMETERS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]


@pytest.mark.parametrize(("body", "words"), [
    ({"tools": TOOLS}, "the default 'auto' is not supported; use 'none', 'required' or"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice 'auto' is not supported; use 'none', 'required' or"),
    ({"tools": BAD_PARAMETERS, "tool_choice": "required"}, "objectx"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "required"}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope', which is not"),
    ({"tool_choice": "required"}, "needs `tools`"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined with response_format"),
    ({"tools": TOOLS, "tool_choice": NAMED, "structured_outputs": {"regex": "a"}},
     "cannot be combined with structured_outputs.regex"),
])
def test_bad_tool_requests_are_400s(client, body, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, extra_body=body)
    assert words in caught.value.body["message"]
