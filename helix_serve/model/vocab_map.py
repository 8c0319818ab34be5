"""How a draft's token ids relate to the target's.

Three cases, one mechanism: the same vocabulary (nothing to do); a draft whose embedding has fewer rows
than the target's (Qwen2.5-0.5B's 151,936 vs 7B's 152,064: ids past the draft's rows have no
embedding); a draft over a sub-vocabulary (`helix_vocab_map` in its config: draft row i is target id
map[i]). Target ids the draft has no row for are fed to it as row 0 (they can only come from the
target or the prompt) and get draft probability 0, which rejection sampling handles exactly.
"""

from __future__ import annotations

import torch

VOCAB_MAP_KEY = "helix_vocab_map"


class VocabMap:
    """Maps target ids into a draft's rows and the draft's logits back onto the target's vocabulary."""

    def __init__(self, draft_rows: int, target_vocab: int, row_to_target: list[int] | None, device: torch.device):
        self.target_vocab = target_vocab
        self.identity = row_to_target is None and draft_rows == target_vocab
        rows = torch.tensor(row_to_target) if row_to_target is not None else torch.arange(draft_rows)
        rows = rows[: target_vocab] if row_to_target is None else rows  # a draft larger than the target: cut
        if int(rows.max()) >= target_vocab:
            raise ValueError(f"the draft's {VOCAB_MAP_KEY} names ids past the target's {target_vocab} tokens")
        self.row_to_target = rows.to(device)  # [V_rows]
        to_row = torch.zeros(target_vocab, dtype=torch.long)
        to_row[rows] = torch.arange(len(rows))
        self.target_to_row = to_row.to(device)  # [V_target]

    @classmethod
    def for_model(cls, config, draft_rows: int, target_vocab: int, device: torch.device) -> VocabMap:
        return cls(draft_rows, target_vocab, getattr(config, VOCAB_MAP_KEY, None), device)

    def inputs(self, target_ids: torch.Tensor) -> torch.Tensor:
        """[T] target ids → [T] draft rows."""
        return target_ids if self.identity else self.target_to_row[target_ids]

    def logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """[N, V_rows] → [N, V_target], -inf where the draft has no row."""
        if self.identity:
            return draft_logits
        out = draft_logits.new_full((draft_logits.shape[0], self.target_vocab), float("-inf"))
        return out.index_copy_(1, self.row_to_target, draft_logits[:, : len(self.row_to_target)])
