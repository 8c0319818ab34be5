"""Rotary position embedding looked up from a table instead of recomputed every pass.

transformers' rotary module computes cos and sin for a pass's positions in ~10 small ops (~15 µs at decode sizes
on a 2-vCPU Zen 5): once per target forward and once per EAGLE-head drafting pass, several of them a step. Every
value is elementwise in its position (a frequency times the position, then cos / sin), so a table computed once by
the same module holds the same values bit for bit, and a pass reads its rows in one op. Rope types whose
frequencies follow the longest position of the call ("dynamic", "longrope") are computed per call, as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FIRST_ROWS = 1024  # positions the table starts with; it doubles as passes reach further


class RopeTable:
    """cos and signed sin of one rotary module, per (dtype, device), for `rotate`."""

    def __init__(self, rotary_emb: nn.Module):
        self.rotary_emb = rotary_emb
        rope_type = str(getattr(rotary_emb, "rope_type", "default"))
        self.per_call = "dynamic" in rope_type or rope_type == "longrope"
        self.tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype,
                 bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[...] positions → cos and signed sin, [..., head_dim] in `dtype`. `bound`: an int above every position
        (the caller usually knows it; None: read from `positions`, a host sync)."""
        if self.per_call:
            return self._compute(positions, dtype)
        bound = int(positions.max()) + 1 if bound is None else bound
        key = (dtype, positions.device)
        table = self.tables.get(key)
        if table is None or table[0].shape[0] < bound:
            rows = max(FIRST_ROWS, 2 * table[0].shape[0] if table is not None else 0)
            while rows < bound:
                rows *= 2
            table = self.tables[key] = self._compute(torch.arange(rows, device=positions.device), dtype)
        return F.embedding(positions, table[0]), F.embedding(positions, table[1])

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        shape = positions.shape
        probe = torch.empty(0, dtype=dtype, device=positions.device)  # the module reads only its dtype and device
        cos, sin = self.rotary_emb(probe, positions.reshape(1, -1))
        half = cos.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.view(*shape, -1), sin.view(*shape, -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of [..., heads, D] by [..., 1, D] cos and signed sin: x·cos + rotate_half(x)·sin, where rotate_half(x)·sin
    equals roll(x, D/2)·[−sin₁, sin₂] (one op fewer than the cat of rotate_half)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)
