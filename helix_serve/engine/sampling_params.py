"""Per-request sampling and speculation settings."""

from __future__ import annotations

from dataclasses import dataclass, field

# Below this a temperature means greedy: logits / T would overflow to ±inf (1e-39 gives NaN probabilities),
# and long before that the distribution is one-hot in float32 anyway.
GREEDY_TEMPERATURE = 1e-5


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
    num_speculative_tokens: int | None = None  # fixed K for this request; None = adaptive
    timeout_s: float | None = None  # deadline from arrival; the request ends with finish_reason "timeout"

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
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        """The one place that decides greedy: the sampler then uses one-hot distributions."""
        return self.temperature < GREEDY_TEMPERATURE
