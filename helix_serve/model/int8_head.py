"""An 8-bit LM head for CPU decoding under `quantization: int4`.

The LM head is the largest single read of a small model's decode step (SmolLM2-135M: 49,152 × 576, 57 MB in bf16,
113 MB in fp32; its GGUF stores it at 8 bits, Q8_0). Here it is int8 with a bf16 scale per output row (symmetric,
per channel: torch's `_weight_int8pack_mm`, bf16 activations), read at a quarter of the fp32 bytes. That kernel
wins for a few rows and loses for many (measured on a Zen 4 core: 4.8 vs 10.0 ms at one row, 26.8 vs 12.1 ms at
16), so the head measures both kernels when it is built and sends passes wider than the crossing to a bf16 GEMM
over the same dequantized weights. The two paths round differently (like any bf16 batch shape), which the int4
numerics already allow (model/int4.py); per-channel int8 is coarser than Q8_0's blocks of 32 (about 1 % of a
row's largest weight at most).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

PROBE_ROWS = (1, 2, 4, 8, 16, 32)


class Int8Head(nn.Module):
    """`layer`'s weight as int8 codes with a bf16 scale per output row; `max_rows`: the widest pass that uses the
    int8 kernel (wider passes multiply by the dequantized weight in bf16)."""

    def __init__(self, layer: nn.Linear, max_rows: int | None = None):
        super().__init__()
        weight = layer.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
        codes = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.register_buffer("dequantized", (codes.float() * self.scales.float()[:, None]).to(torch.bfloat16))
        self.out_features = layer.out_features
        self.max_rows = fastest_int8_rows(self) if max_rows is None else max_rows

    def int8(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.codes, self.scales)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.dequantized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, in] → [rows, out] in fp32."""
        return (self.int8(x) if x.shape[0] <= self.max_rows else self.dense(x)).float()


def _median_s(fn, x: torch.Tensor, repeats: int = 3) -> float:
    fn(x)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def fastest_int8_rows(head: Int8Head) -> int:
    """The widest of PROBE_ROWS at which the int8 kernel beats the bf16 GEMM on this CPU, measured now (0: never,
    e.g. where the int8 kernel has no fast path for this CPU)."""
    best = 0
    with torch.inference_mode():
        for rows in PROBE_ROWS:
            x = torch.randn(rows, head.codes.shape[1])
            if _median_s(head.int8, x) >= _median_s(head.dense, x):
                break
            best = rows
    return best
