"""Tool-call formatting without a server: a generated call split into OpenAI's message and stream chunks,
including calls cut short by max_tokens (tests/test_structured_api.py runs them through a real app)."""

from __future__ import annotations

import pytest

from helix_serve.serving.openai_format import ToolCallChunks
from helix_serve.serving.tool_calls import call_message, split_call

HEAD = '{"name": "get_w", "arguments": '
ARGUMENTS = '{"city": "Paris", "days": [1, 2]}'
CALL = HEAD + ARGUMENTS + "}"
CUT = HEAD + '{"city": "Par'  # cut short by max_tokens


def stream(text: str, step: int, reason: str, empty_last: bool = False) -> list[dict]:
    """The chunks of one choice whose output arrives `step` characters at a time, ending with `reason` (on the
    last piece, or on an empty chunk after it)."""
    shapes = ToolCallChunks("chatcmpl-1", "m", 0, logprobs=False)
    chunks = shapes.opening(0)
    for start in range(0, len(text), step):
        last = start + step >= len(text) and not empty_last
        chunks += shapes.choice(0, text[start:start + step], reason if last else None, [])
    if empty_last:
        chunks += shapes.choice(0, "", reason, [])
    return [c["choices"][0] for c in chunks]


def test_split_call_drops_only_the_closing_brace_of_a_complete_call():
    assert split_call(CALL, complete=True) == ("get_w", ARGUMENTS)
    assert split_call(CUT, complete=False) == ("get_w", '{"city": "Par')
    assert split_call('{"name": "get', complete=False) is None


def test_message_of_complete_and_cut_calls():
    message = call_message(CALL)
    (call,) = message["tool_calls"]
    assert message["content"] is None and call["id"].startswith("call_") and len(call["id"]) == 29
    assert call["type"] == "function" and call["function"] == {"name": "get_w", "arguments": ARGUMENTS}
    assert call_message(CUT)["tool_calls"][0]["function"]["arguments"] == '{"city": "Par'
    assert call_message('{"name": "ge') == {"role": "assistant", "content": '{"name": "ge'}


@pytest.mark.parametrize("empty_last", [False, True])
def test_stream_opens_with_the_head_then_argument_pieces_without_the_closing_brace(empty_last):
    choices = stream(CALL, 7, "stop", empty_last)
    assert choices[0]["delta"] == {"role": "assistant", "content": None}
    head = choices[1]["delta"]["tool_calls"][0]
    assert head["index"] == 0 and head["type"] == "function" and head["function"] == {"name": "get_w", "arguments": ""}
    pieces = [c["delta"]["tool_calls"][0] for c in choices[2:] if c["delta"]]
    assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in pieces)
    assert "".join(p["function"]["arguments"] for p in pieces) == ARGUMENTS
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["tool_calls"]


def test_stream_cut_by_max_tokens_keeps_the_partial_arguments_and_its_reason():
    choices = stream(CUT, 4, "length")
    pieces = [c["delta"]["tool_calls"][0]["function"]["arguments"] for c in choices[2:] if c["delta"]]
    assert "".join(pieces) == '{"city": "Par' and choices[-1]["finish_reason"] == "length"
    cut = stream('{"name": "ge', 4, "length")
    assert [c["delta"] for c in cut[1:] if c["delta"]] == [{"content": '{"name": "ge'}]
    assert cut[-1]["finish_reason"] == "length"
