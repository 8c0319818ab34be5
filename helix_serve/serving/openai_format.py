"""OpenAI wire shapes (completions, chat, models, errors) built from Helix generations."""

from __future__ import annotations

from typing import Any

from helix_serve.serving.engine_client import Generation


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


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "helix"}]}


def _usage_of(generations: list[Generation]) -> dict[str, Any]:
    return usage(sum(g.num_prompt_tokens for g in generations), sum(len(g.token_ids) for g in generations),
                 sum(g.stats.get("num_cached_tokens", 0) for g in generations))


def completion(response_id: str, model: str, created: int, generations: list[Generation]) -> dict[str, Any]:
    choices = [{"index": i, "text": g.text, "logprobs": None, "finish_reason": finish_reason(g.finish_reason)}
               for i, g in enumerate(generations)]
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": _usage_of(generations)}


def chat_completion(response_id: str, model: str, created: int, generation: Generation) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": generation.text}, "logprobs": None,
              "finish_reason": finish_reason(generation.finish_reason)}
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": _usage_of([generation])}


def completion_chunk(response_id: str, model: str, created: int, text: str, reason: str | None,
                     chunk_usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [] if chunk_usage else [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": chunk_usage}


def chat_chunk(response_id: str, model: str, created: int, delta: dict[str, str], reason: str | None,
               chunk_usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [] if chunk_usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
    return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "usage": chunk_usage}
