"""Load a target/draft pair (hub id or local directory) with transformers' own loading code."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from helix_serve.model.paged_llm import SUPPORTED_MODEL_TYPES, PagedCausalLM

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class IncompatiblePairError(ValueError):
    """Target and draft cannot be paired (different vocabularies)."""


@dataclass(slots=True)
class ModelPair:
    """The target, the optional draft, and the tokenizer they share."""

    target: PagedCausalLM
    draft: PagedCausalLM | None
    tokenizer: PreTrainedTokenizerBase
    target_name: str
    draft_name: str | None


def resolve_dtype(name: str, config_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' takes the checkpoint's dtype, except fp16 on CPU (slow or missing kernels) which runs in fp32."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected auto or one of {sorted(DTYPES)}")
        return DTYPES[name]
    dtype = config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32
    if dtype == torch.float16 and device.type == "cpu":
        return torch.float32
    return dtype


def _check_architecture(name: str, config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{name}: architecture {config.model_type!r} is not supported ({SUPPORTED_MODEL_TYPES})")
    if getattr(config, "use_sliding_window", False):
        raise ValueError(f"{name}: sliding-window attention is not supported")


def load_model(name: str, device: torch.device, dtype: str = "auto") -> PagedCausalLM:
    """Load one causal LM by hub id or local path and wrap it for paged attention."""
    config = AutoConfig.from_pretrained(name)
    _check_architecture(name, config)
    torch_dtype = resolve_dtype(dtype, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None), device)
    hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    hf_model.to(device).eval()
    logger.info("loaded %s (%s, %s) on %s", name, config.model_type, torch_dtype, device)
    return PagedCausalLM(hf_model)


def check_compatible(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    """Speculation compares token ids, so both models must use the same vocabulary."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise IncompatiblePairError(
            f"target {target_name!r} and draft {draft_name!r} have incompatible tokenizers "
            f"({len(target_tok)} vs {len(draft_tok)} tokens, or different token ids)"
        )


def load_model_pair(target: str, draft: str | None, device: torch.device, dtype: str = "auto") -> ModelPair:
    """Load the target and (optionally) the draft, refusing a pair whose vocabularies differ."""
    tokenizer = AutoTokenizer.from_pretrained(target)
    if draft is not None:
        check_compatible(tokenizer, AutoTokenizer.from_pretrained(draft), target, draft)
    target_model = load_model(target, device, dtype)
    draft_model = load_model(draft, device, dtype) if draft is not None else None
    return ModelPair(target_model, draft_model, tokenizer, target, draft)
