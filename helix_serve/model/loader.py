"""Load a target/draft pair (hub id, local directory or GGUF file) with transformers' own loading code."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from helix_serve.config import QUANTIZATIONS
from helix_serve.device import preferred_cpu_dtype
from helix_serve.model.int4 import int4_available
from helix_serve.model.paged_llm import SUPPORTED_MODEL_TYPES, PagedCausalLM
from helix_serve.model.sources import ModelSource, ModelSourceError, resolve_source

# GGUF names of the decoder projections (attention and MLP), which `quantization` concerns
PROJECTION_TENSORS = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}

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


def resolve_dtype(
    name: str, config_dtype: torch.dtype | None, device: torch.device, cpu_flags: set[str] | None = None
) -> torch.dtype:
    """'auto': on a CPU, bf16 where it computes bf16 natively (AVX512_BF16 / AMX) and fp32 elsewhere, whatever
    the checkpoint's dtype (emulated bf16 and fp16 GEMMs are several times slower than fp32); on an
    accelerator, the checkpoint's dtype."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected auto or one of {sorted(DTYPES)}")
        return DTYPES[name]
    if device.type == "cpu":
        return preferred_cpu_dtype(cpu_flags)
    return config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32


def check_architecture(name: str, config) -> None:
    """Refuse an architecture the paged model cannot run, before any weights are loaded."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(
            f"{name}: architecture {config.model_type!r} is not supported (Helix runs {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(config, "use_sliding_window", False):
        raise ModelSourceError(f"{name}: sliding-window attention is not supported")


def _load_config(source: ModelSource):
    """The model's config; a GGUF that transformers cannot read becomes a clear error."""
    if not source.gguf_file:
        return AutoConfig.from_pretrained(source.path)
    try:
        return AutoConfig.from_pretrained(source.path, **source.kwargs)
    except Exception as exc:  # transformers raises ValueError/KeyError/struct errors for bad or unsupported GGUFs
        raise ModelSourceError(
            f"{source.name}: transformers cannot read this GGUF file ({type(exc).__name__}: {exc}); "
            f"Helix supports GGUF files of the {', '.join(SUPPORTED_MODEL_TYPES)} architectures"
        ) from exc


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a named model (from the GGUF metadata for a GGUF file)."""
    source = resolve_source(name)
    return AutoTokenizer.from_pretrained(source.path, **source.kwargs)


def gguf_projection_types(source: ModelSource) -> set[str]:
    """The GGUF quantization types of a GGUF checkpoint's decoder projections (empty for other checkpoints)."""
    if not source.gguf_file:
        return set()
    import gguf  # transformers' GGUF loader needs it installed anyway

    path = Path(source.path)
    # GGUFReader looked up at call time: inside gguf_parsed_once, this parse is the one the config and weights reuse
    reader = gguf.GGUFReader(str(path if path.is_file() else path / source.gguf_file))
    return {t.tensor_type.name for t in reader.tensors
            if t.name.startswith("blk.") and t.name.split(".")[-2] in PROJECTION_TENSORS}


def resolve_quantization(quantization: str, source: ModelSource, device: torch.device) -> str:
    """'auto': int4 on a CPU that runs the int4 kernel when every projection of the file is Q4_1 — 4-bit codes
    with a scale and a minimum per 32 inputs, the grid Int4Linear recovers exactly, so nothing is lost that the
    file had — and none otherwise (Q4_0's symmetric grid is not recovered exactly by min/max requantization)."""
    if quantization != "auto":
        return quantization
    if int4_available(device) is not None:
        return "none"
    return "int4" if gguf_projection_types(source) == {"Q4_1"} else "none"


_GGUF_PATCH = threading.RLock()  # one loader at a time patches gguf (re-entered by load_model in load_model_pair)


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers' GGUF loading parses the file's metadata anew for the tokenizer, the config and the weights
    (gguf.GGUFReader, ~3-4 s each for SmolLM2's 49k-token vocabulary), and asks gguf for its tensor-name map once
    per submodule of the model (~400 times, ~7 s), though that map depends only on (architecture, layers). Within
    this block each file is parsed once and each map built once (both are only read): transformers imports them
    from gguf at call time, so the memos replace gguf's attributes meanwhile (GGUFReader is then a function, not
    a class: nothing here subclasses it or checks isinstance)."""
    import gguf

    with _GGUF_PATCH:
        reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        parse = functools.lru_cache(maxsize=None)(reader)
        gguf.GGUFReader = lambda path, *args, **kwargs: parse(os.path.realpath(path), *args, **kwargs)
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def load_model(name: str, device: torch.device, dtype: str = "auto", quantization: str = "none",
               int4_dense_rows: int | str = 0) -> PagedCausalLM:
    """Load one causal LM by hub id, local path or GGUF file and wrap it for paged attention (int4_dense_rows:
    `PagedCausalLM`)."""
    source = resolve_source(name)
    with gguf_parsed_once():
        quantization = resolve_quantization(quantization, source, device)
        config = _load_config(source)
        check_architecture(name, config)
        torch_dtype = resolve_dtype(dtype, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None),
                                    device)
        hf_model = AutoModelForCausalLM.from_pretrained(source.path, config=config, dtype=torch_dtype,
                                                        **source.model_kwargs)
    hf_model.to(device).eval()
    logger.info("loaded %s (%s) on %s in %s (dtype %s, quantization %s)", name, config.model_type, device,
                torch_dtype, dtype, quantization)
    return PagedCausalLM(hf_model, quantization, int4_dense_rows)


def check_compatible(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    """Speculation compares token ids, so both models must use the same vocabulary."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise IncompatiblePairError(
            f"target {target_name!r} and draft {draft_name!r} have incompatible tokenizers "
            f"({len(target_tok)} vs {len(draft_tok)} tokens, or different token ids)"
        )


def load_model_pair(
    target: str, draft: str | None, device: torch.device, dtype: str = "auto", quantization: str = "none",
    int4_dense_rows: int | str = 0,
) -> ModelPair:
    """Load the target and (optionally) the draft, refusing a pair whose vocabularies differ. `quantization`
    applies to the target: the draft is small, and its weights decide only how much speculation pays."""
    if quantization == "int4" and (reason := int4_available(device)):  # before any loading
        raise ValueError(reason)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
    with gguf_parsed_once():
        tokenizer = load_tokenizer(target)
        if draft is not None:
            check_compatible(tokenizer, load_tokenizer(draft), target, draft)
        target_model = load_model(target, device, dtype, quantization, int4_dense_rows)
        draft_model = load_model(draft, device, dtype) if draft is not None else None  # the draft stays as loaded
    return ModelPair(target_model, draft_model, tokenizer, target, draft)
