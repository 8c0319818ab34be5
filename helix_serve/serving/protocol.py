"""What the ingress and the engine replicas send each other through a DeploymentHandle.

Plain dataclasses with no torch import, so the ingress process never loads the engine stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class EngineRequest:
    """One generation: a prompt or chat messages, plus `SamplingParams` keyword arguments.

    `sampling["max_tokens"]` None means "up to the context": the engine fills in what the context and its
    KV pool leave after the prompt, at most `max_tokens_limit` (the ingress's configured limit).
    """

    request_id: str
    sampling: dict[str, Any]
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None  # rendered with the engine's chat template
    max_tokens_limit: int | None = None
    choice: int = 0  # which of its prompt's n choices (OpenAI's n); the later ones share the first's prompt


@dataclass(slots=True)
class TokenLogprobs:
    """The target's log-probability of one emitted token (`token` is its text), and `top`: the requested
    number of most likely tokens at that position as (text, logprob) pairs, most likely first."""

    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(slots=True)
class EngineChunk:
    """One piece of a generation stream (the replica sends them in messages: lists of chunks, in order).

    The first chunk is the admission: `status_code` set means the request was refused (4xx, or 503 when
    the engine cannot take it now) and the stream ends; otherwise it carries `num_prompt_tokens`. Each
    later chunk is the tokens of one engine step (`step_ks`: its K when it speculated); the last has `finished`
    and `stats`, or an `error` (with `status_code` 503 when the failure was the engine's, not the request's: worth
    retrying).
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    num_drafted: int = 0
    num_accepted: int = 0
    step_ks: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    status_code: int | None = None
    stats: dict[str, Any] | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token in `token_ids`, when the request asked
