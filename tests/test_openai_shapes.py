"""Real OpenAI clients' request shapes over HTTP (issue 19, items 5, 8, 9, 10), sent both with the official
`openai` client and as raw JSON, against a local Serve app whose model has a strict chat template."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

from tests.serve_harness import MODEL, app_args, build_test_app, local_serve

CONTEXT = 96  # max_model_len of this app: "up to the context" stays short
# Roles must alternate, as Llama 2's and Mistral's templates demand; any role name is rendered.
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == loop.previtem['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
# OpenAI's shapes: a developer message, text parts, a tools-only assistant turn (null content), a tool result
MESSAGES = [
    {"role": "developer", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "the quick"}, {"type": "text", "text": "brown fox"}]},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    {"role": "tool", "content": "jumps", "tool_call_id": "call_1"},
    {"role": "user", "content": "over the lazy dog"},
]
# The same conversation as plain strings: what the engine's template must receive
PLAIN = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the quick\nbrown fox"},
    {"role": "assistant", "content": ""},
    {"role": "tool", "content": "jumps"},
    {"role": "user", "content": "over the lazy dog"},
]


@pytest.fixture(scope="module")
def base_url(llama_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("templated")
    pair = []
    for source in llama_pair:
        target = root / source.name
        shutil.copytree(source, target)
        config_path = target / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "chat_template": STRICT_TEMPLATE}))
        pair.append(target)
    app = build_test_app(app_args(tuple(pair), max_model_len=CONTEXT), {"ray_actor_options": {"num_cpus": 0.5}})
    with local_serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def chat(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": MODEL, **body})


def test_chat_without_max_tokens_generates_up_to_the_context(http, client):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    completion = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                extra_body={"ignore_eos": True})
    usage = completion.usage
    assert usage.completion_tokens == CONTEXT - usage.prompt_tokens > 16  # not the legacy 16
    assert completion.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    assert list(stream)[-1].usage.completion_tokens == usage.completion_tokens
    body = chat(http, messages=messages, temperature=0, ignore_eos=True).json()  # raw JSON: the same
    assert body["usage"]["completion_tokens"] == usage.completion_tokens
    assert body["choices"][0]["message"]["content"] == completion.choices[0].message.content
    legacy = http.post("/v1/completions", json={"model": MODEL, "prompt": "the quick", "ignore_eos": True})
    assert legacy.json()["usage"]["completion_tokens"] == 16  # /v1/completions keeps OpenAI's default


def test_max_completion_tokens_wins_over_max_tokens(http, client):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    body = chat(http, messages=messages, max_tokens=3, max_completion_tokens=5, ignore_eos=True).json()
    assert body["usage"]["completion_tokens"] == 5
    completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                                max_completion_tokens=6, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 6
    assert chat(http, messages=messages, max_tokens=4, ignore_eos=True).json()["usage"]["completion_tokens"] == 4


def test_content_parts_null_content_tool_and_developer_roles(http, client):
    expected = chat(http, messages=PLAIN, max_tokens=8, temperature=0).json()
    raw = chat(http, messages=MESSAGES, max_tokens=8, temperature=0)
    assert raw.status_code == 200, raw.text
    sdk = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    for body in (raw.json(), sdk.model_dump()):
        assert body["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
        assert body["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    # `system` and `developer` render alike; the template saw the joined text parts
    assert chat(http, messages=[{"role": "developer", "content": "x"}, {"role": "user", "content": "hi"}],
                max_tokens=1).json()["usage"]["prompt_tokens"] == \
        chat(http, messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}],
             max_tokens=1).json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize(("messages", "needle"), [
    ([{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                   {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
     "content part 1 has type 'image_url'"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
     "'input_audio'"),
    ([{"role": "user", "content": None}], "user message needs content"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "text"),
])
def test_unsupported_content_is_a_400_that_names_it(http, client, messages, needle):
    response = chat(http, messages=messages)
    assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages)
    assert needle in info.value.body["message"]


def test_null_sampling_fields_mean_the_defaults(http, client):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "top_k": None}
    seeded = {"messages": messages, "max_tokens": 8, "seed": 7}
    with_nulls, without = chat(http, **seeded, **nulls), chat(http, **seeded)
    assert with_nulls.status_code == 200, with_nulls.text
    assert with_nulls.json()["choices"] == without.json()["choices"]  # default temperature 1, same seed
    completion = client.chat.completions.create(model=MODEL, **seeded, temperature=None, top_p=None, n=None,
                                                stream=None)
    assert completion.choices[0].message.content == without.json()["choices"][0]["message"]["content"]
    legacy = http.post("/v1/completions", json={"model": MODEL, "prompt": "the quick", "max_tokens": 4, **nulls})
    assert legacy.status_code == 200, legacy.text


def test_chat_template_errors_are_a_400_naming_the_problem(http, client):
    twice = [{"role": "user", "content": "hi"}, {"role": "user", "content": "hello?"}]
    for stream in (False, True):
        response = chat(http, messages=twice, stream=stream)
        assert response.status_code == 400, response.text
        assert "must alternate" in response.json()["error"]["message"]
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert "retry-after" not in response.headers  # retrying the same messages can never work
    with pytest.raises(openai.BadRequestError, match="must alternate"):
        client.chat.completions.create(model=MODEL, messages=twice)


# ---- issue 16: penalties, min_p and logit_bias reach the engine; unimplemented fields are 400s ------------------


def test_logit_bias_reaches_the_engine_on_every_route(http, client, llama_pair):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama_pair[0]))
    messages = [{"role": "user", "content": "the quick brown fox"}]
    greedy = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    for word in (" fox", " dog"):
        forced = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))[0]
        expected = tokenizer.decode([forced] * 6)  # +100 all but forces the token at every position
        completion = client.chat.completions.create(model=MODEL, messages=messages, logit_bias={str(forced): 100},
                                                    extra_body=greedy)
        assert completion.choices[0].message.content == expected
        for speculative in (True, False):
            native = http.post("/generate", json={"prompt": "the quick", "logit_bias": {str(forced): 100},
                                                  "speculative": speculative, **greedy})
            assert native.status_code == 200 and native.json()["generated_text"] == expected, native.text


def test_penalties_and_min_p_are_accepted_and_validated(http, client):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    fields = {"presence_penalty": 1.5, "frequency_penalty": 0.5}
    extra = {"repetition_penalty": 1.3, "min_p": 0.1, "max_tokens": 8, "seed": 3}
    completion = client.chat.completions.create(model=MODEL, messages=messages, **fields, extra_body=extra)
    assert completion.usage.completion_tokens > 0
    legacy = http.post("/v1/completions", json={"model": MODEL, "prompt": "the quick", **fields, **extra})
    assert legacy.status_code == 200, legacy.text
    for bad, needle in (({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
                        ({"min_p": 2}, "min_p"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                        ({"logit_bias": {"3": 101}}, "logit_bias"), ({"logit_bias": {"99999999": 1}}, "logit_bias")):
        response = chat(http, messages=messages, **bad)
        assert response.status_code == 400 and needle in response.text, response.text


@pytest.mark.parametrize("field, value", [
    ("logprobs", True), ("top_logprobs", 3), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("response_format", {"type": "json_object"}),
])
def test_unimplemented_chat_fields_are_a_400_that_names_them(http, client, field, value):
    messages = [{"role": "user", "content": "hi"}]
    response = chat(http, messages=messages, **{field: value})
    assert response.status_code == 400 and f"`{field}`" in response.json()["error"]["message"], response.text
    with pytest.raises(openai.BadRequestError, match=field):
        client.chat.completions.create(model=MODEL, messages=messages, **{field: value})


@pytest.mark.parametrize("field, value", [("logprobs", 0), ("echo", True), ("best_of", 2), ("suffix", "end")])
def test_unimplemented_completion_fields_are_a_400_that_names_them(http, field, value):
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", field: value})
    assert response.status_code == 400 and f"`{field}`" in response.json()["error"]["message"], response.text


def test_off_values_of_unimplemented_fields_are_fine(http):
    off = {"logprobs": False, "tools": [], "response_format": {"type": "text"}, "top_logprobs": None}
    response = chat(http, messages=[{"role": "user", "content": "hi"}], max_tokens=2, **off)
    assert response.status_code == 200, response.text
