"""The `args` of the Serve application (YAML or `build_app`), validated at the edge."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from helix_serve.config import DEFAULT_DRAFT, DEFAULT_TARGET, EngineConfig


class HelixAppArgs(BaseModel):
    """Everything `build_app` accepts; engine fields map one to one onto `EngineConfig`."""

    model_config = ConfigDict(extra="forbid")

    target_model: str = DEFAULT_TARGET
    draft_model: str | None = DEFAULT_DRAFT
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int = Field(1024, ge=1)
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    num_speculative_tokens: int | None = Field(None, ge=0)
    k_min: int = Field(0, ge=0)
    k_max: int = Field(8, ge=0)
    draft_cost_ratio: float | None = Field(None, gt=0)
    seed: int = 0
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per engine replica")
    served_model_name: str = Field("helix", min_length=1)
    max_batch_prompts: int = Field(16, ge=1, description="most prompts one /generate/batch call may carry")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            target_model=self.target_model, draft_model=self.draft_model, device=self.device, dtype=self.dtype,
            block_size=self.block_size, num_kv_blocks=self.num_kv_blocks, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
            num_speculative_tokens=self.num_speculative_tokens, k_min=self.k_min, k_max=self.k_max,
            draft_cost_ratio=self.draft_cost_ratio, seed=self.seed,
        )


class BatchingConfig(BaseModel):
    """The engine deployment's `user_config`: how `@serve.batch` groups arriving requests."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
