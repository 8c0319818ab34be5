"""Real OpenAI clients' request shapes over HTTP (issue 19, items 5, 8, 9, 10), sent both with the official
`openai` client and as raw JSON, against a local Serve app whose model has a strict chat template."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
import torch

from tests.serve_harness import CLUSTER, MODEL, app_args, build_test_app, wait_kv_free

pytestmark = pytest.mark.serving  # on the session's shared cluster (serve_harness.CLUSTER)

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
    with CLUSTER.serving(app) as url:
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
    for bad, needle in (({"presence_penalty": 3}, "presence_penalty"),
                        ({"repetition_penalty": 0}, "repetition_penalty"),
                        ({"min_p": 2}, "min_p"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                        ({"logit_bias": {"3": 101}}, "logit_bias"), ({"logit_bias": {"99999999": 1}}, "logit_bias")):
        response = chat(http, messages=messages, **bad)
        assert response.status_code == 400 and needle in response.text, response.text


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),  # response_format: test_structured_api.py
])
def test_unimplemented_chat_fields_are_a_400_that_names_them(http, client, field, value):
    messages = [{"role": "user", "content": "hi"}]
    response = chat(http, messages=messages, **{field: value})
    assert response.status_code == 400 and f"`{field}`" in response.json()["error"]["message"], response.text
    with pytest.raises(openai.BadRequestError, match=field):
        client.chat.completions.create(model=MODEL, messages=messages, **{field: value})


@pytest.mark.parametrize("field, value", [("echo", True), ("best_of", 2), ("suffix", "end")])
def test_unimplemented_completion_fields_are_a_400_that_names_them(http, field, value):
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", field: value})
    assert response.status_code == 400 and f"`{field}`" in response.json()["error"]["message"], response.text


def test_off_values_of_unimplemented_fields_are_fine(http):
    off = {"logprobs": False, "tools": [], "response_format": {"type": "text"}, "top_logprobs": None}
    response = chat(http, messages=[{"role": "user", "content": "hi"}], max_tokens=2, **off)
    assert response.status_code == 200, response.text


# ---- issue 16: logprobs, n, stream_options ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(llama_pair):
    """transformers' target model and tokenizer: log_softmax of its logits is what every route must report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(llama_pair[0]), torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(llama_pair[0]))


def target_log_probs(model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """[len(output), V]: the target's log-probabilities at each output position."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output_ids])).logits[0]
    return logits[len(prompt_ids) - 1:-1].log_softmax(dim=-1)


def sse_payloads(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, JSON data) of a Server-Sent Events reply, `[DONE]` left out."""
    events, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:") and line[5:].strip() != "[DONE]":
            events.append((name, json.loads(line[5:])))
        elif not line:
            name = "message"
    return events


SPECULATIVE_GREEDY = {"max_tokens": 16, "temperature": 0, "ignore_eos": True, "num_speculative_tokens": 3}


def test_logprobs_are_the_targets_log_softmax_on_every_route(http, client, reference):
    """Accepted draft tokens and recovered/bonus ones alike (K fixed at 3, so most tokens came from drafts)."""
    model, tokenizer = reference
    prompt = "the quick brown fox"
    native = http.post("/generate", json={"prompt": prompt, "logprobs": 3, **SPECULATIVE_GREEDY}).json()
    entries = native["logprobs"]
    output_ids = [e["token_id"] for e in entries]
    assert len(entries) == native["tokens_generated"] == 16 and native["num_drafted"] > 0
    expected = target_log_probs(model, tokenizer(prompt).input_ids, output_ids)
    got = torch.tensor([e["logprob"] for e in entries])
    torch.testing.assert_close(got, expected.gather(1, torch.tensor(output_ids)[:, None])[:, 0], atol=1e-4, rtol=0)
    top = torch.tensor([[t["logprob"] for t in e["top_logprobs"]] for e in entries])
    torch.testing.assert_close(top, expected.topk(3).values, atol=1e-4, rtol=0)
    # each token's text is what it added to the text (a token ending inside a UTF-8 character adds '')
    assert "".join(e["token"] for e in entries) == native["generated_text"]

    streamed = [d for name, d in sse_payloads(http.post("/generate/stream", json={
        "prompt": prompt, "logprobs": 3, **SPECULATIVE_GREEDY})) if name == "chunk"]
    assert [e for d in streamed for e in d["logprobs"]] == entries

    extra = {"ignore_eos": True, "num_speculative_tokens": 3}
    legacy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, logprobs=3,
                                       extra_body=extra).choices[0].logprobs
    assert legacy.tokens == [e["token"] for e in entries] and legacy.text_offset[0] == 0
    torch.testing.assert_close(torch.tensor(legacy.token_logprobs), got, atol=1e-6, rtol=0)
    assert [len(t) for t in legacy.top_logprobs] == [len({x["token"] for x in e["top_logprobs"]}) for e in entries]
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, logprobs=3,
                                       stream=True, extra_body=extra)
    blocks = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [v for b in blocks for v in b.token_logprobs] == legacy.token_logprobs
    assert [o for b in blocks for o in b.text_offset] == legacy.text_offset


def test_chat_logprobs_and_top_logprobs_streaming_and_not(http, client, reference):
    model, tokenizer = reference
    messages = [{"role": "user", "content": "the quick brown fox"}]
    options = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True,
               "top_logprobs": 2, "extra_body": {"ignore_eos": True, "num_speculative_tokens": 3}}
    content = client.chat.completions.create(**options).choices[0].logprobs.content
    native = http.post("/generate", json={"prompt": messages[0]["content"], "chat": True, "logprobs": 0,
                                          **SPECULATIVE_GREEDY, "max_tokens": 12}).json()  # the token ids
    output_ids = [e["token_id"] for e in native["logprobs"]]
    assert [c.token for c in content] == [e["token"] for e in native["logprobs"]]
    rendered = tokenizer.apply_chat_template(messages, chat_template=STRICT_TEMPLATE, add_generation_prompt=True,
                                             tokenize=False)
    prompt_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert len(prompt_ids) == native["num_prompt_tokens"]
    expected = target_log_probs(model, prompt_ids, output_ids)
    assert len(content) == 12 and all(len(c.top_logprobs) == 2 for c in content)
    torch.testing.assert_close(torch.tensor([c.logprob for c in content]),
                               expected.gather(1, torch.tensor(output_ids)[:, None])[:, 0], atol=1e-4, rtol=0)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    streamed = [e for chunk in client.chat.completions.create(**options, stream=True)
                for choice in chunk.choices if choice.logprobs for e in choice.logprobs.content]
    assert [e.token for e in streamed] == [c.token for c in content]
    # The second request reuses the first one's prompt blocks (prefix cache), so its passes have other shapes and
    # fp32 GEMMs may round the last bits differently (seen on an AVX-512 CPU): equal to fp32 noise, not bitwise.
    assert [e.logprob for e in streamed] == pytest.approx([c.logprob for c in content], abs=1e-5)
    plain = client.chat.completions.create(**{**options, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_n_choices_are_distinct_and_each_reproducible_from_its_seed(client):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    sampled = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 1.0,
               "extra_body": {"ignore_eos": True}}
    many = client.chat.completions.create(**sampled, n=3, seed=11)
    texts = [c.message.content for c in sorted(many.choices, key=lambda c: c.index)]
    assert [c.index for c in many.choices] == [0, 1, 2] and len(set(texts)) == 3
    singles = [client.chat.completions.create(**sampled, seed=11 + i) for i in range(3)]
    assert texts == [s.choices[0].message.content for s in singles]
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once
    assert many.usage.completion_tokens == 24

    stream = client.chat.completions.create(**sampled, n=3, seed=11, stream=True,
                                            stream_options={"include_usage": True})
    pieces, roles, last = {0: "", 1: "", 2: ""}, set(), None
    for chunk in stream:
        last = chunk
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
            roles |= {choice.index} if choice.delta.role == "assistant" else set()
    assert [pieces[i] for i in range(3)] == texts and roles == {0, 1, 2}
    assert last.choices == [] and last.usage.completion_tokens == 24
    assert last.usage.prompt_tokens == many.usage.prompt_tokens


def test_n_with_several_prompts_orders_choices_by_prompt(client):
    options = {"model": MODEL, "max_tokens": 6, "temperature": 1.0, "seed": 5, "extra_body": {"ignore_eos": True}}
    both = client.completions.create(prompt=["the quick", "a lazy dog"], n=2, **options)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    second = client.completions.create(prompt="a lazy dog", n=2, **options)
    assert [c.text for c in both.choices[2:]] == [c.text for c in second.choices]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(prompt=["the quick", "a lazy dog"], n=2, stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(4)] == [c.text for c in both.choices]


def test_completions_stream_usage_matches_the_reply(client):
    options = {"model": MODEL, "prompt": "the quick", "max_tokens": 7, "temperature": 0,
               "extra_body": {"ignore_eos": True}}
    usage = client.completions.create(**options).usage
    chunks = list(client.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == usage
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(**options, stream=True))
    assert all(c.usage is None for c in plain)


def test_leaving_a_stream_of_n_choices_aborts_them_all(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "the quick"}], "n": 3, "stream": True,
            "max_tokens": 80, "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # leave after the first token
    assert wait_kv_free(http, timeout_s=10) == 0


@pytest.mark.parametrize("route, body, needle", [
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 5}, "n=5"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, "n=2"),
])
def test_bad_logprobs_and_n_are_400s_naming_the_field(http, route, body, needle):
    response = http.post(route, json={"model": MODEL, "max_tokens": 2, **body})
    assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text


def test_native_logprobs_are_validated(http):
    for value in (-1, 21, True, "3"):  # strict, as every native field
        response = http.post("/generate", json={"prompt": "hi", "logprobs": value})
        assert response.status_code == 422 and "logprobs" in response.text, response.text
