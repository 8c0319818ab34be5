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
    """One message of a generation stream.

    The first chunk is the admission: `status_code` set means the request was refused (4xx, or 503 when
    the engine cannot take it now) and the stream ends; otherwise it carries `num_prompt_tokens`. Each
    later chunk is the tokens of one engine step, or of several when the replica coalesced chunks that
    waited for a slow consumer (`step_ks`: each speculative step's K); the last has `finished` and `stats`,
    or an `error` (with `status_code` 503 when the failure was the engine's, not the request's: worth retrying).
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    num_drafted: int = 0  # over the chunk's steps
    num_accepted: int = 0
    step_ks: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    status_code: int | None = None
    stats: dict[str, Any] | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token in `token_ids`, when the request asked

    def absorb(self, later: EngineChunk) -> None:
        """Append the next chunk of the same stream, one without an error, to this one (its tokens, counts and,
        if it ends the stream, its ending)."""
        self.text += later.text
        self.token_ids += later.token_ids
        self.num_drafted += later.num_drafted
        self.num_accepted += later.num_accepted
        self.step_ks += later.step_ks
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finished, self.finish_reason, self.stats = later.finished, later.finish_reason, later.stats
