"""The LM head at 8 bits under `quantization: int4`: MXINT8 values (OCP Microscaling: 8-bit codes sharing a
power-of-two scale per 32 inputs), read through torch's CPU int4 kernel for the few rows of a decode step.

Why: at batch 1 the LM head is the largest single read of an int4 step (SmolLM2: 49,152 × 576, 57 MB in bf16,
~3.3 ms of a ~16 ms step on two threads of the dev VM). An 8-bit code c is two 4-bit halves, c + 128 =
16·hi + lo, so one int4 GEMM over the halves' rows reads ~35 MB (scales included) and computes the head:
1.6 vs 3.2 ms at one row, 2.9 vs 3.6 ms at four (2 threads; 3.3 vs 6.5 ms at one row on one thread).
Above four rows that kernel, which works through its rows four at a time and is compute-bound, falls behind
the bf16 GEMM (5.7 vs 3.8 ms at five rows, 13 vs 5.5 at sixteen), so wider passes (verify passes, batches)
run a bf16 GEMM of the same values.

Why power-of-two scales: |c| ≤ 127 has 7 significant bits, so c·2^e is exact in bf16 (and fp32). Both
kernels then multiply the same weights by the same bf16 activations and sum in fp32; they differ only in the
order of that sum and in rounding their output to bf16, a last-bit difference like the one the batch's shape
already makes in the int4 projections (README: `quantization`). An 8-bit head whose values were not exact
in bf16 (the withdrawn int8 kernel, per-row scales) was a different head above its row limit, and made int4
greedy output depend on the batch. The loaded head (and the embedding, when tied to it) is rounded to these
values in place, so transformers' reference forward and the embedding lookup see the head that runs. The
rounding error is at most half a step, step ≤ 2·max|w|/127 per group: within 2× of GGUF's Q8_0.
"""

from __future__ import annotations

import torch
from torch import nn

from helix_serve.model.int4 import GROUP_SIZE, quantizable

MAX_ROWS = 4  # up to here the int4 kernel reads the head faster than the bf16 GEMM (measured above)


def mxint8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in [-127, 127], power-of-two scales [out, in / 32, 1]) with codes · scale closest to `weight`."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    amax = groups.abs().amax(-1, keepdim=True)
    mantissa, exponent = torch.frexp(amax / 127)  # amax / 127 = m · 2^e with m in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # the smallest power of two ≥ amax / 127
    scale = torch.ldexp(torch.ones_like(amax), exponent)
    codes = torch.round(groups / scale).clamp_(-127, 127)
    return codes, scale


class MXInt8Head(nn.Module):
    """Rounds `lm_head` to MXINT8 values in place and computes it for up to MAX_ROWS rows at 8 bits."""

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        if lm_head.bias is not None or not quantizable(lm_head):
            raise ValueError("the 8-bit head needs a bias-free head with in_features % 32 == 0, out_features % 16 == 0")
        codes, scale = mxint8(lm_head.weight)
        with torch.no_grad():
            lm_head.weight.copy_((codes * scale).view_as(lm_head.weight))  # exact in the head's dtype
        halves = (codes + 128).to(torch.int32)  # 1 … 255 = 16·hi + lo
        hi, lo = halves // 16, halves % 16
        # The kernel computes (q - 8) · s + z per group: hi rows give scale · (16·(hi - 8) + 8), lo rows
        # scale · (lo - 8); their sum is scale · (16·hi + lo - 128) = scale · code. The kernel rounds each half's
        # output to bf16, so the half near the logit's size (hi) carries the zero and lo stays small and centred.
        scale = scale[..., 0].t()  # [in / 32, out]
        scales_and_zeros = torch.cat((torch.stack((16 * scale, 8 * scale), -1),
                                      torch.stack((scale, torch.zeros_like(scale)), -1)), dim=1)  # [in/32, 2·out, 2]
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())
        packed = torch.cat((hi, lo)).view(2 * lm_head.out_features, lm_head.in_features)
        self.register_buffer("packed_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(packed, 1))
        self.out_features = lm_head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, in] → [rows, out] fp32 logits."""
        both = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(), self.packed_weight, GROUP_SIZE, self.scales_and_zeros)
        return both[:, : self.out_features].float().add_(both[:, self.out_features:])
