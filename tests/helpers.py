"""Test helpers shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

import torch

from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine

PROMPTS = [
    "the quick brown",
    "speculative decoding drafts tokens and the target",
    "def",
    "paged attention reads keys and values through a block table and the quick brown fox jumps",
    "the lazy dog",
    "return a",
    "block table",
    "tokens and the target verifies them and the quick brown fox jumps over the lazy dog again",
]


def make_engine(pair: tuple[Path, Path], **overrides) -> LLMEngine:
    target, draft = pair
    settings = dict(target_model=str(target), draft_model=str(draft), device="cpu", dtype="float32",
                    block_size=4, num_kv_blocks=512)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))


def hf_greedy(engine: LLMEngine, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate on the target alone, EOS ignored."""
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = engine.pair.target.hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()
