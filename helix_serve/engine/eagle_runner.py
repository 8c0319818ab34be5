"""Run an EAGLE head over a varlen batch on the sequences' shared block tables (its own one-layer pool).

The head's entry t (the target's feature at position t with token t+1) lives at position t's slot, so its
K/V share the sequence's block table like a draft model's. `Sequence.num_draft_cached` counts its real
entries (fed the target's features); entries fed the head's own output while drafting are overwritten
by the next catch-up, which is how rollback works here too.
"""

from __future__ import annotations

import torch

from helix_serve.model.attention import AttentionMetadata
from helix_serve.model.eagle_head import EagleHead
from helix_serve.model.paged_llm import KVCache
from helix_serve.model.vocab_map import VocabMap


class EagleRunner:
    """Owns the head and its KV pool; turns (feature, next token) chunks into target-vocabulary logits."""

    def __init__(self, head: EagleHead, kv_cache: KVCache, block_size: int, vocab_size: int):
        self.head = head
        self.model = head  # what calibration and the engine read (dtype, shape)
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = head.device
        self.capture_layers = head.config.capture_layers
        self.vocab_map = VocabMap(len(head.config.vocab_ids), vocab_size, list(head.config.vocab_ids), self.device)

    @torch.inference_mode()
    def logits(self, block_tables: list[list[int]], features: torch.Tensor, chunks: list[list[int]],
               starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One head pass: entries starts[i] .. starts[i] + len(chunks[i]) - 1 of sequence i, with [T, H] fused
        features and the next tokens `chunks`. Returns each chunk's last entry's [N, V] logits (-inf outside
        the sub-vocabulary) and its [N, H] output feature (the next entry's feature when chaining)."""
        query_lens = [len(c) for c in chunks]
        context_lens = [s + n for s, n in zip(starts, query_lens)]
        meta = AttentionMetadata.build(block_tables, context_lens, query_lens, self.block_size, self.device)
        token_ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=self.device)
        hidden = self.head(features.to(self.head.dtype), token_ids, meta, self.kv_cache)  # [T, H]
        last = (torch.tensor(query_lens).cumsum(0) - 1).to(self.device)
        return self.vocab_map.logits(self.head.compute_logits(hidden[last])), hidden[last]


class HeadPasses:
    """The head behind `ModelRunner.logits`'s signature, for calibration (step_cost.calibrate_forward)."""

    def __init__(self, runner: EagleRunner):
        self.runner = runner
        self.device, self.vocab_size = runner.device, runner.vocab_size
        self.width = runner.head.config.hidden_size * len(runner.capture_layers)  # the captured target states

    def logits(self, block_tables: list[list[int]], chunks: list[list[int]], starts: list[int],
               num_logits: list[int]) -> torch.Tensor:
        """One head pass over these entries, fed zero target features: its cost does not depend on their values.
        Every pass fuses them as a catch-up pass does; a chained pass skips that one [3H → H] row, a small
        overestimate for one-token rows."""
        features = torch.zeros(sum(len(c) for c in chunks), self.width, dtype=self.runner.head.dtype,
                               device=self.runner.device)
        return self.runner.logits(block_tables, self.runner.head.fuse(features), chunks, starts)[0]
