"""Per-request sampling and speculation settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from helix_serve.engine.structured.constraint import Constraint

# Below this a temperature means greedy: logits / T would overflow to ±inf (1e-39 gives NaN probabilities),
# and long before that the distribution is one-hot in float32 anyway.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # most alternatives per emitted token (OpenAI's chat limit)
SPECULATIVE_METHODS = ("draft", "ngram", "hybrid", "eagle")  # proposers; hybrid: the model one or ngram, per step
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, 100 all but forces it


@dataclass(slots=True)
class SamplingParams:
    """How one request samples and stops. temperature 0 (or below GREEDY_TEMPERATURE) means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    speculative: bool = True
    num_speculative_tokens: int | None = None  # fixed K for this request; None = planned per step
    speculative_method: str | None = None  # draft | ngram | hybrid | eagle for this request; None = the engine's
    timeout_s: float | None = None  # deadline from arrival; the request ends with finish_reason "timeout"
    # Logits processing (logits_processors.py), applied identically to draft and target logits:
    repetition_penalty: float = 1.0  # > 1 discourages prompt and output tokens (HF's and vLLM's rule)
    frequency_penalty: float = 0.0  # OpenAI: minus this times each token's count in the output
    presence_penalty: float = 0.0  # OpenAI: minus this once for each token present in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (after temperature)
    logprobs: int | None = None  # report the target's log-probabilities: None = off, n = also the n most likely
    structured: Constraint | None = None  # structured output: every token masked by this grammar (structured/)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError("top_k must be an integer >= 0 (0 disables it)")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        if self.speculative_method not in (None, *SPECULATIVE_METHODS):
            raise ValueError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.structured is not None and self.ignore_eos:  # the grammar's end is an end-of-sequence token
            raise ValueError("ignore_eos cannot be combined with a structured-output constraint")
        self._check_logits_processing()

    def _check_logits_processing(self) -> None:
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError("repetition_penalty must be in (0, 100]")
        if not (-2.0 <= self.frequency_penalty <= 2.0 and -2.0 <= self.presence_penalty <= 2.0):
            raise ValueError("frequency_penalty and presence_penalty must be in [-2, 2]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        for token_id, bias in self.logit_bias.items():
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, not {token_id!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")

    @property
    def penalized(self) -> bool:
        """Whether this request's logits depend on its tokens or a bias (logits_processors.py)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or bool(self.logit_bias))

    @property
    def greedy(self) -> bool:
        """The one place that decides greedy: the sampler then uses one-hot distributions."""
        return self.temperature < GREEDY_TEMPERATURE
