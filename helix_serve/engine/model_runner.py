"""Run one model over a varlen batch of token chunks on the shared block tables."""

from __future__ import annotations

import itertools

import torch

from helix_serve.model.attention import AttentionMetadata
from helix_serve.model.paged_llm import KVCache, PagedCausalLM
from helix_serve.model.vocab_map import VocabMap


class ModelRunner:
    """Owns one model and its KV pool; turns token chunks into logits."""

    def __init__(self, model: PagedCausalLM, kv_cache: KVCache, block_size: int, vocab_size: int):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.vocab_size = vocab_size  # the target's: draft logits are mapped onto it
        self.device = model.device
        rows = model.embed_tokens.num_embeddings
        self.vocab_map = VocabMap.for_model(model.hf_model.config, rows, vocab_size, self.device)

    def logits(
        self, block_tables: list[list[int]], chunks: list[list[int]], starts: list[int], num_logits: list[int]
    ) -> torch.Tensor:
        """Logits of the last `num_logits[i]` positions of each chunk, concatenated: [Σ num_logits, V].

        chunks[i] holds the tokens at positions starts[i] .. starts[i] + len(chunks[i]) - 1 of sequence i.
        """
        return self.logits_and_features(block_tables, chunks, starts, num_logits)[0]

    @torch.inference_mode()
    def logits_and_features(
        self, block_tables: list[list[int]], chunks: list[list[int]], starts: list[int], num_logits: list[int],
        capture_layers: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`logits`, and the [Σ len(chunks), len(capture_layers) * hidden] captured states of every token
        (None without capture_layers): an EAGLE head's features come out of the same pass."""
        query_lens = [len(c) for c in chunks]
        context_lens = [s + n for s, n in zip(starts, query_lens)]
        meta = AttentionMetadata.build(block_tables, context_lens, query_lens, self.block_size, self.device)
        input_ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=self.device)
        hidden, features = self.model.forward_with_features(self.vocab_map.inputs(input_ids), meta, self.kv_cache,
                                                            capture_layers)  # [T, hidden]
        ends = itertools.accumulate(query_lens)
        index = torch.tensor([i for e, n in zip(ends, num_logits) for i in range(e - n, e)], device=self.device)
        return self.vocab_map.logits(self.model.compute_logits(hidden[index])), features
