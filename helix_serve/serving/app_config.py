"""The `args` of the Serve application (YAML or `build_app`), validated at the edge."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StringConstraints, model_validator

from helix_serve.config import DEFAULT_DRAFT, DEFAULT_TARGET, QUANTIZATIONS, EngineConfig
from helix_serve.serving.security import SecurityConfig

INGRESS_NAME = "HelixIngress"
DEFAULT_POOL = "HelixEngine"  # the one pool of a config without `pools`: pre-pool YAML files stay valid
DEVICE_PATTERN = r"^(auto|directml|cuda|cpu|cuda:\d+)$"  # what helix_serve.device.resolve_device accepts
PoolName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")]
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", max_length=128)]


def _distinct(cores: list[int]) -> list[int]:
    if len(set(cores)) != len(cores):
        raise ValueError(f"cpu_cores {cores}: a core is named twice")
    return cores


CpuCores = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), AfterValidator(_distinct)]
CPU_CORES_HELP = ("CPU cores reserved for this pool's replicas (Linux): each replica, every thread of it, runs on "
                  "`torch_threads` of them (replicas on one node take successive slices); the ingress and a cluster "
                  "started by `helix serve` keep off them. None: no pinning")


class PoolConfig(BaseModel):
    """One engine pool: a deployment of HelixEngine, named in the YAML, whose replicas share a device kind."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto: DirectML, then CUDA, then CPU")
    capacity: float = Field(1.0, gt=0, description="relative throughput; load = ongoing requests / capacity")
    fallback: Literal["cpu"] | None = Field(None, description="cpu: start on CPU (with a warning) when the "
                                            "pool's device is unavailable, instead of failing")
    cpu_cores: CpuCores | None = Field(None, description=CPU_CORES_HELP)


class RoutingConfig(BaseModel):
    """How the ingress spreads requests over pools and notices a pool without a serving replica."""

    model_config = ConfigDict(extra="forbid")

    admission_timeout_s: float = Field(10.0, gt=0, description="wait this long for a pool to admit a request "
                                       "before trying another pool")
    probe_timeout_s: float = Field(5.0, gt=0, description="a pool that does not answer `info` within this is down")
    probe_interval_s: float = Field(5.0, gt=0)


class ModelArgs(BaseModel):
    """One served model: its pair, engine settings and pools. Engine fields map one to one onto `EngineConfig`."""

    model_config = ConfigDict(extra="forbid")

    target_model: str = DEFAULT_TARGET
    draft_model: str | None = DEFAULT_DRAFT
    eagle_head: str | None = Field(None, description="an EAGLE head directory (`helix distill --method eagle`) "
                                   "instead of the draft model; draft_model then defaults to null")
    device: str = "auto"
    cpu_cores: CpuCores | None = Field(None, description=CPU_CORES_HELP + " (without `pools`; with them, per pool)")
    dtype: str = "auto"
    quantization: Literal[QUANTIZATIONS] = Field(
        "auto", description="auto: int4 on a CPU for a 4-bit (Q4_1 GGUF) checkpoint, else none; int4: the target's "
                            "projections as 4-bit weights (CPU only; not the fp32 numerics); none: as loaded")
    int4_dense_rows: Annotated[StrictInt, Field(ge=0)] | Literal["auto"] = Field(
        0, description="int4: passes of at least this many rows run a bf16 copy of the 4-bit weights (faster under "
                       "load and for prompts; a row's output then depends on its pass's width); auto: measured at "
                       "load; 0: never")
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int = Field(1024, ge=1)
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    speculative_method: Literal["draft", "ngram", "hybrid", "eagle"] | None = Field(
        None, description="proposers the planner may use (eagle: the head only); none: hybrid over the draft "
        "model or the head and prompt lookup, ngram without either")
    num_speculative_tokens: int | None = Field(None, ge=0)
    k_max: int = Field(8, ge=0)
    prompt_lookup_min: int = Field(1, ge=1)
    prompt_lookup_max: int = Field(3, ge=1)
    draft_cost_ratio: float | None = Field(None, gt=0)
    verify_cost_ratio: float | None = Field(None, ge=0)
    seed: int = 0
    enable_prefix_caching: bool = Field(True, description="reuse the K/V of prompt blocks seen before")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per engine replica")
    pools: dict[PoolName, PoolConfig] | None = Field(None, description="engine pools by deployment name; "
                                                     f"none: one pool, {DEFAULT_POOL}, on `device`")

    @model_validator(mode="after")
    def _one_model_proposer(self) -> ModelArgs:
        """A head replaces the default draft model; naming both is a mistake (one model-based proposer)."""
        if self.eagle_head is not None and "draft_model" not in self.model_fields_set:
            self.draft_model = None
        if self.eagle_head is not None and self.draft_model is not None:
            raise ValueError("set draft_model or eagle_head, not both (one model-based proposer per engine)")
        return self

    @model_validator(mode="after")
    def _check_pools(self) -> ModelArgs:
        if self.pools is None:
            return self
        if not self.pools:
            raise ValueError("pools: name at least one pool (or leave `pools` out for the single default pool)")
        for field in ("device", "cpu_cores"):
            if field in self.model_fields_set:
                raise ValueError(f"with `pools`, set `{field}` on each pool, not at the top level")
        if INGRESS_NAME in self.pools:
            raise ValueError(f"pools: {INGRESS_NAME!r} is the ingress deployment's name")
        return self

    def engine_pools(self, default_name: str = DEFAULT_POOL) -> dict[str, PoolConfig]:
        """The pools to bind, by deployment name."""
        return self.pools or {default_name: PoolConfig(device=self.device, cpu_cores=self.cpu_cores)}

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            target_model=self.target_model, draft_model=self.draft_model, eagle_head=self.eagle_head,
            device=self.device, dtype=self.dtype,
            quantization=self.quantization, int4_dense_rows=self.int4_dense_rows,
            block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
            speculative_method=self.speculative_method, num_speculative_tokens=self.num_speculative_tokens,
            k_max=self.k_max, prompt_lookup_min=self.prompt_lookup_min, prompt_lookup_max=self.prompt_lookup_max,
            draft_cost_ratio=self.draft_cost_ratio, verify_cost_ratio=self.verify_cost_ratio, seed=self.seed,
            enable_prefix_caching=self.enable_prefix_caching,
        )


@dataclass(frozen=True, slots=True)
class EngineDeployment:
    """One engine pool of one served model: a deployment of HelixEngine named `name`."""

    name: str
    model: str  # the served model name
    model_args: ModelArgs
    pool: PoolConfig


class HelixAppArgs(ModelArgs):
    """Everything `build_app` accepts: one model's fields at the top level, or several models under `models`."""

    served_model_name: str = Field("helix", min_length=1)
    models: dict[ModelName, ModelArgs] | None = Field(
        None, description="served model name → its pair, engine settings and pools; the first is the default of "
        "requests that name no model; none: the one model of the top-level fields, as `served_model_name`")
    max_batch_prompts: int = Field(16, ge=1, description="most prompts one /generate/batch call may carry")
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig, description="API keys and request limits")

    @model_validator(mode="after")
    def _check_models(self) -> HelixAppArgs:
        if self.models is None:
            return self
        if not self.models:
            raise ValueError("models: name at least one model (or leave `models` out to serve the top-level one)")
        top_level = sorted((self.model_fields_set & set(ModelArgs.model_fields)) | ({"served_model_name"}
                                                                                 & self.model_fields_set))
        if top_level:
            raise ValueError(f"with `models`, set {', '.join(top_level)} on each model (the keys of `models` are "
                             "the served names), not at the top level")
        names = [d.name for d in self.engine_deployments()]
        clashes = sorted({n for n in names if names.count(n) > 1} | ({INGRESS_NAME} & set(names)))
        if clashes:
            raise ValueError(f"models: deployment name(s) {', '.join(clashes)} used twice; name each model's "
                             "pools uniquely across the app")
        return self

    def served_models(self) -> dict[str, ModelArgs]:
        """Every served model by name, the default one first."""
        if self.models is not None:
            return dict(self.models)
        own = {name: getattr(self, name) for name in self.model_fields_set & set(ModelArgs.model_fields)}
        return {self.served_model_name: ModelArgs(**own)}

    def reserved_cores(self) -> list[int]:
        """Every core some engine pool reserves (`cpu_cores`): the ingress and the rest of the cluster keep off them."""
        return sorted({core for d in self.engine_deployments() for core in d.pool.cpu_cores or ()})

    def engine_deployments(self) -> list[EngineDeployment]:
        """Each model's pools; a model of `models` without `pools` gets one pool named HelixEngine-<model>."""
        several = self.models is not None
        return [EngineDeployment(pool_name, model, args, pool)
                for model, args in self.served_models().items()
                for pool_name, pool in args.engine_pools(deployment_name(model) if several else DEFAULT_POOL).items()]


def deployment_name(model: str) -> str:
    """The default pool's deployment name for a served model (Serve names carry no '/' or '.')."""
    return f"{DEFAULT_POOL}-{re.sub(r'[^A-Za-z0-9_-]', '-', model)}"


class BatchingConfig(BaseModel):
    """The engine deployment's `user_config` (changeable live): how a replica groups the requests that arrive
    (`@serve.batch`) and the tokens it streams back."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1)
    # Requests that arrive together are admitted in one engine-thread call; the engine batches sequences step by
    # step anyway, so waiting for more would only delay the first token.
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    # Hand tokens to the stream at most this often (a request's first tokens and its end go at once): each
    # message wakes the replica's event loop and crosses Ray, CPU the engine shares at batch 1 (20 updates a
    # second still read as a smooth stream; 0: one message per engine step).
    stream_interval_s: float = Field(0.05, ge=0, le=1)
