"""Int4 weight-only linear layers for CPU decoding (`quantization: int4`).

Weights are stored as 4-bit codes in groups of 32 input features, each group with its own scale and zero
point (min + scale * q, q in 0..15): the layout of GGUF's Q4_1 blocks. SmolLM2's GGUF stores every
projection as Q4_1 and its dequantized weights lie exactly on that grid, so requantizing them by each
group's min and max recovers the file's own codes; the kernel needs the scales and zero points in bf16,
which typically moves a weight by a few percent of a quantization step. Activations enter the kernel in
bf16 and the output leaves it in bf16 (torch's CPU int4 kernel has no fast fp32 path), so this is not the
fp32 model. Speculative decoding samples from the int4 target's distribution as its verify pass computes
it; in bf16 that distribution moves by rounding with the batch's shape, so greedy output with speculation
can part from the int4 target's own greedy at near-ties.

Why: at decode sizes a CPU forward streams its weights; 4-bit codes are an eighth of fp32. Measured on the
2-vCPU EPYC (AVX2), SmolLM2-135M's 30 layers of projections: 32 ms per token in fp32, 10.5 ms in int4.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP_SIZE = 32


def int4_available(device: torch.device) -> str | None:
    """None when int4 layers can run on `device`, else why not."""
    if device.type != "cpu":
        return f"int4 quantization runs on the CPU only (device is {device.type})"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"int4 quantization needs torch >= 2.6 (_weight_int4pack_mm_for_cpu); this is torch {torch.__version__}"
    return None


def quantizable(layer: nn.Linear) -> bool:
    return layer.in_features % GROUP_SIZE == 0 and layer.out_features % 16 == 0


class Int4Linear(nn.Module):
    """A Linear whose weight is 4-bit codes with a bf16 scale and zero point per group of 32 inputs."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        weight = layer.weight.detach().float()
        out_features, in_features = weight.shape
        groups = weight.view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low) / 15
        codes = torch.round((groups - low) / torch.where(scale == 0, 1, scale)).clamp_(0, 15)
        # The kernel computes (q - 8) * scale + zero; scales and zeros are [in / 32, out, 2].
        zero = low + 8 * scale
        scales_and_zeros = torch.stack((scale[..., 0].t(), zero[..., 0].t()), dim=-1)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.view_as(weight).to(torch.int32), 1)
        self.register_buffer("packed_weight", packed)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(), self.packed_weight, GROUP_SIZE, self.scales_and_zeros
        ).to(x.dtype)
        return out if self.bias is None else out + self.bias
