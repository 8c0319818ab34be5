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

Wide passes: the kernel works through its rows four at a time and, past a few rows, is compute-bound (it
unpacks the weights again for every four rows): SmolLM2's 30 layers of projections on 2 threads of a Xeon with
AMX took 8.3 ms at 4 rows, 26 at 16, 47 at 32 and 349 at 256, where a bf16 GEMM of the same weights streams
them once: 20, 21, 23 and 77 ms (scripts/bench_int4_rows.py). So a layer may keep a bf16 copy of its weights
(`dense`: the kernel's own values, (q - 8) · scale + zero, rounded to bf16, which moves a weight by at most 2^-9
of itself — about a percent of a quantization step in a group whose values straddle zero, more in a group far
from zero) and run passes of at least `dense_rows` rows through it; `choose_dense_rows`
measures where that starts on this CPU (without native bf16 it may be nowhere, and the copies are dropped).
Below `dense_rows` a row's output does not depend on how many rows share the pass; at and above it a row is
computed from the bf16 copy, whose rounding moves a log-probability by up to ~0.1 (0.17 with bf16 activations)
and so flips near-ties with the load or a prefix-cache hit: hence opt-in (README: `int4_dense_rows`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZE = 32
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)  # looked up once: see `int4_available`
DENSE_PROBE_WIDTHS = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)  # rows; see choose_dense_rows


def int4_available(device: torch.device) -> str | None:
    """None when int4 layers can run on `device`, else why not."""
    if device.type != "cpu":
        return f"int4 quantization runs on the CPU only (device is {device.type})"
    if _INT4_MM is None:
        return f"int4 quantization needs torch >= 2.6 (_weight_int4pack_mm_for_cpu); this is torch {torch.__version__}"
    return None


def quantizable(layer: nn.Linear) -> bool:
    return layer.in_features % GROUP_SIZE == 0 and layer.out_features % 16 == 0


class Int4Linear(nn.Module):
    """A Linear whose weight is 4-bit codes with a bf16 scale and zero point per group of 32 inputs."""

    def __init__(self, layer: nn.Linear, dense: bool = False):
        """dense: keep a bf16 copy of the 4-bit weights for wide passes (module docstring); they run through it
        once `dense_rows` is set (choose_dense_rows)."""
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
        # Not a buffer: a derived copy, dropped when it does not pay (choose_dense_rows), never saved.
        self.dense: torch.Tensor | None = None
        if dense:  # the kernel's values: (q - 8) * scale + zero from the bf16 scales and zeros, in fp32
            kernel_scale, kernel_zero = self.scales_and_zeros.float().unbind(-1)  # [in / 32, out] each
            values = (codes - 8) * kernel_scale.t()[..., None] + kernel_zero.t()[..., None]
            self.dense = values.view(out_features, in_features).to(torch.bfloat16)
        self.dense_rows = 0  # 0: every pass through the kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Lean on purpose (paged_llm.linear calls it directly, 120 times a SmolLM2 forward): each skipped no-op
        # conversion or attribute lookup is ~0.5 µs, and the kernel itself takes ~25 µs at one row.
        out = self.dense_mm(x) if 0 < self.dense_rows <= x.shape[0] else self.kernel_mm(x)
        if out.dtype is not x.dtype:
            out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias

    def kernel_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ through the int4 kernel: bf16 in, bf16 out, no bias."""
        x = x if x.dtype is torch.bfloat16 else x.to(torch.bfloat16)
        return _INT4_MM(x.contiguous(), self.packed_weight, GROUP_SIZE, self.scales_and_zeros)

    def dense_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ through the bf16 copy: bf16 in, bf16 out, no bias."""
        return F.linear(x if x.dtype is torch.bfloat16 else x.to(torch.bfloat16), self.dense)


def choose_dense_rows(layers: Sequence[Int4Linear], widths: Sequence[int] = DENSE_PROBE_WIDTHS,
                      repeats: int = 3) -> int:
    """Time `layers` (a model's projections, in the order a forward runs them) through the kernel and through
    their bf16 copies at growing widths: the first width where the copies win, or 0 when they never do. The
    kernel's cost grows with the rows four at a time, the copies' hardly until the GEMM turns compute-bound, so
    a win holds for wider passes."""
    for width in widths:
        kernel, dense = time_both_paths(layers, width, repeats)
        if dense < kernel:
            return width
    return 0


def time_both_paths(layers: Sequence[Int4Linear], width: int, repeats: int) -> tuple[float, float]:
    """Seconds for `layers` over `width` random rows through the kernel, and through their bf16 copies (the best of
    `repeats` each)."""
    gen = torch.Generator().manual_seed(width)  # not the global generator: loading a model leaves its state alone
    inputs = [torch.randn(width, layer.in_features, dtype=torch.bfloat16, generator=gen) for layer in layers]
    with torch.inference_mode():
        kernel = best_time(lambda: [layer.kernel_mm(x) for layer, x in zip(layers, inputs)], repeats)
        dense = best_time(lambda: [layer.dense_mm(x) for layer, x in zip(layers, inputs)], repeats)
    return kernel, dense


def use_dense_rows(layers: Sequence[Int4Linear], rows: int) -> int:
    """Run passes of at least `rows` rows through the layers' bf16 copies; 0: none, and drop the copies."""
    for layer in layers:
        if rows and layer.dense is None:
            raise ValueError("this layer keeps no bf16 copy (Int4Linear(dense=True))")
        layer.dense_rows = rows
        if not rows:
            layer.dense = None
    return rows


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed."""
    fn()  # warm: first-touch of the inputs and the kernels' own setup
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
