"""OpenAI wire shapes (completions, chat, models, errors) built from Helix generations."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from helix_serve.serving.engine_client import Generation
from helix_serve.serving.protocol import TokenLogprobs
from helix_serve.serving.tool_calls import call_message, is_complete, split_call, tool_call


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's 'stop' and 'length', plus Helix's 'timeout' (the request's `timeout_s` deadline passed);
    'error' never reaches a successful response."""
    return reason if reason in ("length", "timeout") else ("stop" if reason else None)


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens = prompt tokens whose K/V came from the prefix cache."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}


def error_body(message: str, error_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def models_list(models: list[str], created: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": model, "object": "model", "created": created, "owned_by": "helix"} for model in models]}


def _usage_of(generations: list[Generation], n: int) -> dict[str, Any]:
    """One prompt's tokens per n choices (OpenAI's count), every choice's completion tokens."""
    firsts = generations[::n]
    return usage(sum(g.num_prompt_tokens for g in firsts), sum(len(g.token_ids) for g in generations),
                 sum(g.stats.get("num_cached_tokens", 0) for g in firsts))


def completion_logprobs(logprobs: list[TokenLogprobs], text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape; `text_offset` counts characters of the completion's tokens."""
    offsets = list(accumulate((len(lp.token) for lp in logprobs), initial=text_offset))[:len(logprobs)]
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [dict(lp.top) for lp in logprobs], "text_offset": offsets}


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(logprobs: list[TokenLogprobs]) -> dict[str, Any]:
    content = [{**_token(lp.token, lp.logprob), "top_logprobs": [_token(t, v) for t, v in lp.top]} for lp in logprobs]
    return {"content": content, "refusal": None}


def completion(response_id: str, model: str, created: int, generations: list[Generation], n: int,
               logprobs: bool) -> dict[str, Any]:
    choices = [{"index": i, "text": g.text, "logprobs": completion_logprobs(g.logprobs) if logprobs else None,
                "finish_reason": finish_reason(g.finish_reason)} for i, g in enumerate(generations)]
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": _usage_of(generations, n)}


def _chat_choice(index: int, generation: Generation, logprobs: bool, tools: bool) -> dict[str, Any]:
    message = call_message(generation.text) if tools else {"role": "assistant", "content": generation.text}
    reason = "tool_calls" if tools and is_complete(generation.text) else finish_reason(generation.finish_reason)
    return {"index": index, "message": message, "logprobs": chat_logprobs(generation.logprobs) if logprobs else None,
            "finish_reason": reason}


def chat_completion(response_id: str, model: str, created: int, generations: list[Generation],
                    logprobs: bool, tools: bool = False) -> dict[str, Any]:
    """`tools`: each generation is a constrained tool call (tool_calls.py), returned as `message.tool_calls`."""
    choices = [_chat_choice(i, g, logprobs, tools) for i, g in enumerate(generations)]
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": _usage_of(generations, len(generations))}


@dataclass(slots=True)
class CompletionChunks:
    """The chunks of a streamed /v1/completions reply (choice i of prompt p has index p × n + i)."""

    response_id: str
    model: str
    created: int
    logprobs: bool
    _offsets: dict[int, int] = field(default_factory=dict)  # characters streamed so far, per choice

    def _chunk(self, choices: list[dict[str, Any]], chunk_usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": self.response_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": chunk_usage}

    def opening(self, index: int) -> list[dict[str, Any]]:
        return []

    def choice(self, index: int, text: str, reason: str | None,
               logprobs: list[TokenLogprobs]) -> list[dict[str, Any]]:
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + sum(len(lp.token) for lp in logprobs)
        block = completion_logprobs(logprobs, offset) if self.logprobs else None
        return [self._chunk([{"index": index, "text": text, "logprobs": block, "finish_reason": reason}])]

    def usage(self, chunk_usage: dict[str, Any]) -> dict[str, Any]:
        return self._chunk([], chunk_usage)


@dataclass(slots=True)
class ChatChunks:
    """The chunks of a streamed /v1/chat/completions reply: each choice opens with the assistant role."""

    response_id: str
    model: str
    created: int
    logprobs: bool

    def _chunk(self, choices: list[dict[str, Any]], chunk_usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": self.response_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices, "usage": chunk_usage}

    def opening(self, index: int) -> list[dict[str, Any]]:
        return [self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])]

    def choice(self, index: int, text: str, reason: str | None,
               logprobs: list[TokenLogprobs]) -> list[dict[str, Any]]:
        block = chat_logprobs(logprobs) if self.logprobs else None
        delta = {"content": text} if text else {}
        return [self._chunk([{"index": index, "delta": delta, "logprobs": block, "finish_reason": reason}])]

    def usage(self, chunk_usage: dict[str, Any]) -> dict[str, Any]:
        return self._chunk([], chunk_usage)


@dataclass(slots=True)
class ToolCallChunks(ChatChunks):
    """A streamed tool call, as OpenAI streams one: a first `delta.tool_calls` entry with the id, type, name
    and empty arguments, then pieces of the arguments, then `finish_reason: "tool_calls"`."""

    _texts: dict[int, str] = field(default_factory=dict)  # each choice's output so far
    _sent: dict[int, int] = field(default_factory=dict)  # characters of its arguments streamed (absent: no head)

    def opening(self, index: int) -> list[dict[str, Any]]:
        return [self._chunk([{"index": index, "delta": {"role": "assistant", "content": None}, "logprobs": None,
                              "finish_reason": None}])]

    def choice(self, index: int, text: str, reason: str | None,
               logprobs: list[TokenLogprobs]) -> list[dict[str, Any]]:
        full = self._texts[index] = self._texts.get(index, "") + text
        complete = reason is not None and is_complete(full)
        call = split_call(full, complete)
        chunks = [] if call is None or index in self._sent else [self._head(index, call[0])]
        delta = self._delta(index, full, call, reason)
        finish = "tool_calls" if complete else reason
        if delta or finish or logprobs:
            block = chat_logprobs(logprobs) if self.logprobs else None
            chunks.append(self._chunk([{"index": index, "delta": delta, "logprobs": block, "finish_reason": finish}]))
        return chunks

    def _head(self, index: int, name: str) -> dict[str, Any]:
        self._sent[index] = 0
        head = {"index": 0, **tool_call(name, "")}
        return self._chunk([{"index": index, "delta": {"tool_calls": [head]}, "logprobs": None,
                             "finish_reason": None}])

    def _delta(self, index: int, full: str, call: tuple[str, str] | None, reason: str | None) -> dict[str, Any]:
        """The next piece of the arguments (a call cut before its name is complete ends as text)."""
        if call is None:
            return {"content": full} if reason is not None else {}
        # NOTE: mid-stream the last character is held back: it may be the call's closing brace, not arguments.
        visible = call[1] if reason is not None else call[1][:-1]
        sent = self._sent[index]
        self._sent[index] = max(sent, len(visible))
        piece = visible[sent:]
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} if piece else {}
