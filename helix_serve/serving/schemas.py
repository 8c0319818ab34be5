"""HTTP request and response bodies. Validation here turns bad input into a 4xx with a clear message."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from helix_serve.engine.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS
from helix_serve.engine.structured.constraint import Constraint
from helix_serve.serving.protocol import TokenLogprobs
from helix_serve.serving.structured_request import StructuredFields
from helix_serve.serving.tool_calls import NamedToolChoice, Tool, tool_constraint

SAMPLING_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "speculative",
                   "num_speculative_tokens", "speculative_method", "timeout_s", "repetition_penalty",
                   "frequency_penalty", "presence_penalty",
                   "min_p", "logit_bias", "logprobs"}

TIMEOUT_HELP = "deadline in seconds from arrival; generation then ends with finish_reason 'timeout'"
# Larger than any vocabulary: a top_k at or above the model's vocabulary size keeps every token.
MAX_TOP_K = 1 << 20
SpeculativeMethod = Literal["draft", "ngram", "hybrid", "eagle"]
METHOD_HELP = ("proposers for this request: draft (the draft model), eagle (the EAGLE head), ngram (prompt lookup) "
               "or hybrid (the loaded model-based one or ngram, chosen per step); none: the server's")
TOP_K_HELP = f"0 disables top-k; at most {MAX_TOP_K} (values at or above the vocabulary size keep every token)"
LOGPROBS_HELP = ("report the target's log-probability of each emitted token (log_softmax of its raw logits) "
                 "and of this many most likely alternatives; null: off")
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions (chat's top_logprobs goes to MAX_LOGPROBS)
MAX_N = 128  # choices per OpenAI request; the ingress also caps prompts × n at its max_batch_prompts


def _non_blank(value: str, name: str) -> str:
    if not value.strip():
        raise ValueError(f"{name} must not be empty or whitespace")
    return value


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's `logit_bias` ({"token id as a string": bias in [-100, 100]}) with integer keys."""
    out = {}
    for key, value in (bias or {}).items():
        if not str(key).isdigit():
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), not {key!r}")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                             f"not {value!r} for token {key}")
        out[int(key)] = float(value)
    return out


class PenaltyFields(BaseModel):
    """Logits processing applied identically to draft and target (engine/logits_processors.py)."""

    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, description="> 1 discourages prompt and output tokens")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens less likely than min_p × the most likely")
    logit_bias: dict[str, float] | None = Field(None, description='{"token id": bias in [-100, 100]}')

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        _logit_bias(bias)
        return bias

    def penalty_sampling(self) -> dict[str, Any]:
        return {"logit_bias": _logit_bias(self.logit_bias)}


def _stop_list(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if any(not s for s in stops):
        raise ValueError("stop strings must be non-empty")
    return stops


class SamplingFields(StructuredFields, PenaltyFields):
    """Sampling and speculation knobs shared by every generation route (native defaults: greedy)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description=TOP_K_HELP)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False
    speculative: bool = True
    num_speculative_tokens: int | None = Field(None, ge=0, description="fixed K; None = planned per step")
    speculative_method: SpeculativeMethod | None = Field(None, description=METHOD_HELP)
    timeout_s: float | None = Field(None, gt=0, description=TIMEOUT_HELP)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=LOGPROBS_HELP)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: list[str]) -> list[str]:
        return _stop_list(stop)

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments for the engine's SamplingParams."""
        return {**self.model_dump(include=SAMPLING_FIELDS), **self.penalty_sampling(), "structured": self.constraint()}


MODEL_HELP = "served model name (GET /v1/models lists them); none: the app's default model"


class GenerateRequest(SamplingFields):
    prompt: str
    model: str | None = Field(None, description=MODEL_HELP)
    chat: bool = Field(False, description="send `prompt` as one user message through the model's chat template")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str) -> str:
        return _non_blank(prompt, "prompt")

    def engine_prompt(self) -> dict[str, Any]:
        """The EngineRequest fields for this prompt: plain text, or a one-message chat."""
        return {"messages": [{"role": "user", "content": self.prompt}]} if self.chat else {"prompt": self.prompt}


class BatchGenerateRequest(SamplingFields):
    prompts: list[str] = Field(min_length=1)
    model: str | None = Field(None, description=MODEL_HELP)

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, prompts: list[str]) -> list[str]:
        return [_non_blank(p, f"prompts[{i}]") for i, p in enumerate(prompts)]


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    """The target's log-probability of one emitted token, and of the most likely tokens at its position."""

    token: str
    token_id: int
    logprob: float
    top_logprobs: list[TopLogprob]

    @classmethod
    def of(cls, logprob: TokenLogprobs) -> TokenLogprob:
        top = [TopLogprob(token=t, logprob=v) for t, v in logprob.top]
        return cls(token=logprob.token, token_id=logprob.token_id, logprob=logprob.logprob, top_logprobs=top)


class GenerateResponse(BaseModel):
    request_id: str
    generated_text: str
    finish_reason: str | None
    num_prompt_tokens: int
    tokens_generated: int
    time_seconds: float
    tokens_per_second: float
    time_to_first_token: float | None
    num_drafted: int
    num_accepted: int
    acceptance_rate: float | None
    mean_accepted_length: float | None
    per_position_acceptance: list[float | None]  # None: that draft position was never reached
    by_proposer: dict[str, dict[str, int]]  # "draft" / "ngram" -> num_drafted, num_accepted
    num_preemptions: int
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when the request asked


class BatchGenerateResponse(BaseModel):
    results: list[GenerateResponse]
    num_prompts: int
    total_tokens_generated: int
    time_seconds: float  # wall time of the whole batch, as the client saw it
    tokens_per_second: float


# ---- OpenAI-compatible ----------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI's spec lets a client send null for these, meaning "the default".
NULL_MEANS_DEFAULT = frozenset({"temperature", "top_p", "top_k", "n", "stream", "ignore_eos", "speculative",
                                "frequency_penalty", "presence_penalty", "repetition_penalty", "min_p", "logprobs"})


def _requested(value: Any) -> bool:
    """Whether an OpenAI field asks for something: null, false, 0, "" and [] are its off values."""
    return value not in (None, False, 0, "", [], {})


# OpenAI fields Helix does not implement: asking for them is a 400 naming the field, never silently ignored.
UNSUPPORTED = {
    "tools": _requested,
    "functions": _requested,
    "echo": _requested,
    "suffix": _requested,
    "best_of": lambda v: _requested(v) and v != 1,
    "function_call": _requested,
    "tool_choice": lambda v: _requested(v) and v != "none",
    "modalities": lambda v: _requested(v) and v != ["text"],
    "audio": _requested,
    "prediction": _requested,
}


class OpenAISamplingFields(StructuredFields, PenaltyFields):
    """OpenAI fields we honour, plus Helix extensions (top_k, repetition_penalty, min_p, structured_outputs,
    ... as vLLM takes them: extra body fields). A field that is neither OpenAI's nor Helix's is a 400 naming
    it (OpenAI's own behaviour), never silently dropped."""

    model_config = ConfigDict(extra="forbid")

    unsupported: ClassVar[dict[str, Any]] = UNSUPPORTED
    # OpenAI fields that do not change the output: accepted and ignored.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None  # a constrained tool call is one call
    # OpenAI fields Helix does not implement: the validator above refuses them unless off (see UNSUPPORTED).
    tools: Any = None
    functions: Any = None
    function_call: Any = None
    tool_choice: Any = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description=TOP_K_HELP)
    seed: int | None = None
    stop: str | list[str] | None = None  # normalised to a list by the validator below
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt; with a seed, choice i uses seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    speculative: bool = True
    num_speculative_tokens: int | None = Field(None, ge=0)
    speculative_method: SpeculativeMethod | None = Field(None, description=METHOD_HELP)  # a Helix extension
    timeout_s: float | None = Field(None, gt=0, description=TIMEOUT_HELP)  # a Helix extension (extra_body)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, asks in cls.unsupported.items():
                if name in data and asks(data[name]):
                    raise ValueError(f"`{name}` is not supported by Helix; leave it out")
            return {k: v for k, v in data.items() if not (v is None and k in NULL_MEANS_DEFAULT)}
        return data

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        return _stop_list(value)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling(self, default_max_tokens: int | None) -> dict[str, Any]:
        """SamplingParams keyword arguments; max_tokens None means "up to the context" (the engine decides)."""
        fields = {**self.model_dump(include=SAMPLING_FIELDS), **self.penalty_sampling()}
        fields["max_tokens"] = self.requested_max_tokens or default_max_tokens
        fields["stop"] = _stop_list(self.stop)
        fields["logprobs"] = self.engine_logprobs
        fields["structured"] = self.constraint()
        return fields

    @property
    def engine_logprobs(self) -> int | None:
        """How many alternatives per token the engine reports (None: no logprobs)."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAISamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS, strict=True, description=LOGPROBS_HELP)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, str):
            return _non_blank(prompt, "prompt")
        if not prompt:
            raise ValueError("prompt must not be an empty list")
        return [_non_blank(p, f"prompt[{i}]") for i, p in enumerate(prompt)]

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def engine_logprobs(self) -> int | None:
        return self.logprobs


def _text_parts(parts: list[Any]) -> list[Any]:
    """OpenAI's content parts: only `{"type": "text", "text": ...}` can be read by a text model."""
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"has type {kind!r}" if isinstance(kind, str) else "is not a typed content part"
            raise ValueError(f"content part {i} {what}; only text parts are supported")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content part {i}: `text` must be a string")
    return parts


class ChatMessage(BaseModel):
    """One OpenAI chat message. Content is a string or a list of text parts (joined with newlines);
    null only on assistant turns (e.g. ones that only called tools). `developer` is sent as `system`;
    other fields (`name`, `tool_calls`, `tool_call_id`) are ignored."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, content: str | list[Any] | None) -> str | list[Any] | None:
        return _text_parts(content) if isinstance(content, list) else content

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (null is allowed on assistant messages only)")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part["text"] for part in self.content)
        return self.content or ""

    def engine_message(self) -> dict[str, str]:
        """The message as the engine's chat template receives it."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class ChatCompletionRequest(OpenAISamplingFields):
    unsupported: ClassVar[dict[str, Any]] = {k: v for k, v in UNSUPPORTED.items() if k not in ("tools", "tool_choice")}

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: NamedToolChoice | str | None = None  # which values are supported: tool_calls.py
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="report the target's log-probability of each output token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True,
                                     description="with logprobs: this many most likely tokens at each position")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    @model_validator(mode="after")
    def _tools_alone(self) -> ChatCompletionRequest:
        if self.calls_tool and self._requested_constraints():
            names = ", ".join(name for name, _ in self._requested_constraints())
            raise ValueError(f"a tool call (tool_choice 'required' or a named function) cannot be combined with {names}")
        return self

    @property
    def calls_tool(self) -> bool:
        """Whether the output is constrained to a tool call (tool_calls.py)."""
        return self.tool_constraint() is not None

    def tool_constraint(self) -> Constraint | None:
        return tool_constraint(self.tools, self.tool_choice)

    def constraint(self) -> Constraint | None:
        return self.tool_constraint() or super().constraint()

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        # NOTE: max_completion_tokens replaced the deprecated max_tokens: when both are sent, it wins.
        return self.max_completion_tokens or self.max_tokens

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text.strip() for m in messages):
            raise ValueError("messages must contain some non-empty content")
        return messages
