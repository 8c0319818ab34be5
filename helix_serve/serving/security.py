"""The ingress's security settings (app args) and the live guard its middlewares consult."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)
API_KEYS_ENV = "HELIX_API_KEYS"  # comma-separated; keys never go into the YAML, only a file's path does


class RequestLimits(BaseModel):
    """What the ingress refuses before anything reaches an engine."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    max_prompt_chars: int = Field(32_000, ge=1, description="per prompt, or all chat messages together")
    # NOTE: a ceiling, not the real bound: the engine refuses max_tokens >= the model's context length.
    max_tokens: int = Field(1 << 17, ge=1, description="the largest max_tokens a request may ask for")
    max_stop_strings: int = Field(8, ge=0)
    max_stop_chars: int = Field(64, ge=1, description="the longest stop string")


class SecurityConfig(BaseModel):
    """The `security` app arg."""

    model_config = ConfigDict(extra="forbid")

    api_keys_file: str | None = Field(None, description="one key per line ('#' comments); adds to $HELIX_API_KEYS")
    metrics_require_key: bool = Field(False, description="also require a key on /metrics")
    limits: RequestLimits = Field(default_factory=RequestLimits)


def load_api_keys(api_keys_file: str | None) -> list[str]:
    """Keys from $HELIX_API_KEYS and the file; none means the server is open."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",")]
    if api_keys_file is not None:
        lines = Path(api_keys_file).read_text().splitlines()  # a missing file fails the replica: fail closed
        keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    return [k for k in keys if k]


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking a key's length.
    return hashlib.sha256(key.encode()).digest()


class Guard:
    """What the auth and limit middlewares check, set once when the ingress replica starts."""

    def __init__(self) -> None:
        self.config = SecurityConfig()
        self.max_batch_prompts = 16
        self._key_digests: list[bytes] = []

    def configure(self, config: SecurityConfig, max_batch_prompts: int) -> None:
        self.config, self.max_batch_prompts = config, max_batch_prompts
        self._key_digests = [_digest(k) for k in load_api_keys(config.api_keys_file)]
        if self._key_digests:
            logger.info("API keys required (%d keys configured)", len(self._key_digests))  # never the keys
        else:
            logger.warning("no API keys configured: generation routes are open to anyone who can connect")

    @property
    def requires_keys(self) -> bool:
        return bool(self._key_digests)

    def accepts(self, token: str) -> bool:
        """Constant time in the token and over every key (no early exit on a match)."""
        digest = _digest(token)
        return sum(hmac.compare_digest(digest, k) for k in self._key_digests) > 0

    @property
    def limits(self) -> RequestLimits:
        return self.config.limits
