"""How many rows a CPU fp32 projection should compute for a pass of n tokens, measured at load.

torch's CPU fp32 GEMM tiles the pass's tokens: with the weight as the left operand (paged_llm.linear) the
tokens are the output's columns, and a width the kernel does not tile well costs more than a wider one.
Measured on a 2-vCPU EPYC Zen 5 (AVX-512), SmolLM2-135M's 30 layers of projections: 12 tokens 41 ms, 13–14 52
ms, 15 64 ms, 16 32 ms; 31 tokens 76 ms, 32 45 ms; one token 23 ms, two 12 (one column goes to a GEMV kernel
that streams a cold weight slower). A whole forward of 13 tokens took 61 ms, of 16 tokens 41. So a pass
computes its projections over zero rows appended up to the cheapest width at or above its own (the narrowest of
near-ties), when that is clearly cheaper (`GAIN`); the padding rows' outputs are dropped. From 12 tokens up the
real rows came out bitwise as without padding on that machine (gate_up's shape: the same kernel and summation
order); below that a different width can change the kernel, as the pass's own width already does.

The table is timed once per process for each model shape, on random weights of one layer's projection shapes
(hot in cache), up to COLD_ROWS tokens on enough copies to stream from memory, which is where a GEMV loses
(~1 s for SmolLM2's shapes). It depends on the CPU and its BLAS, hence measured rather than assumed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

MAX_ROWS = 128  # widths timed; wider passes are computed as they come (prefill: compute-bound, little to gain)
GAIN = 0.75  # pad only to a width at most this fraction of the pass's own time: a near-tie stays unpadded
SWEEPS = 3
TIE = 1.05  # widths timed within this factor of each other are a tie
COLD_ROWS = 4  # widths up to this are timed on weights streamed from memory: there a pass streams them
COLD_BYTES = 128 << 20  # weights cycled through for those (beyond the CPU's caches)


def widths_for(shapes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> tuple[int, ...]:
    """`padded_widths` for a model on CPU in fp32 (its weight-major GEMMs, paged_llm.linear); () elsewhere."""
    if device.type != "cpu" or dtype != torch.float32:
        return ()
    return padded_widths(tuple(tuple(shape) for shape in shapes), torch.get_num_threads())


@functools.cache
def padded_widths(shapes: tuple[tuple[int, int], ...], threads: int) -> tuple[int, ...]:
    """widths[n]: the rows to compute for a pass of n tokens (n ≤ MAX_ROWS; index 0 unused), for one layer's
    projection weight shapes [(out, in), ...] in fp32 at `threads` threads (part of the key: the kernels differ)."""
    weights = [torch.randn(n, k) for n, k in shapes]
    copies = max(COLD_BYTES // sum(w.numel() * 4 for w in weights), 1)
    cold = [w for _ in range(copies) for w in (torch.full((n, k), 0.5) for n, k in shapes)]  # written: real pages
    inputs = {n: [torch.randn(n, w.shape[1]) for w in (cold if n <= COLD_ROWS else weights)]
              for n in range(1, MAX_ROWS + 1)}
    seconds = [float("inf")] * (MAX_ROWS + 1)
    for _ in range(SWEEPS):  # every width once per sweep: a slow spell of the machine must hit all sweeps to count
        for n, xs in inputs.items():
            seconds[n] = min(seconds[n], _time(cold if n <= COLD_ROWS else weights, xs))
    return choose_widths(seconds)


def choose_widths(seconds: Sequence[float]) -> tuple[int, ...]:
    """widths[n] from seconds[n], the time of each width (index 0 unused): the cheapest width at or above n among
    those timed alike (streamed from memory up to COLD_ROWS, from cache beyond; the narrowest within TIE of it),
    where it saves at least 1 − GAIN."""
    top = len(seconds) - 1
    widths = [0]
    for n in range(1, top + 1):
        candidates = range(n, min(COLD_ROWS, top) + 1) if n <= COLD_ROWS else range(n, top + 1)
        cheapest = min(seconds[m] for m in candidates)
        best = next(m for m in candidates if seconds[m] <= TIE * cheapest)  # the narrowest of near-ties
        widths.append(best if seconds[best] <= GAIN * seconds[n] else n)
    return tuple(widths)


def _time(weights: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> float:
    start = time.perf_counter()
    for w, x in zip(weights, inputs):
        torch.mm(w, x.t())
    return time.perf_counter() - start


def pad_rows(x: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """x with zero rows appended up to its padded width (x itself when there is none or no gain)."""
    rows = x.shape[0]
    width = widths[rows] if rows < len(widths) else rows
    return F.pad(x, (0, 0, 0, width - rows)) if width > rows else x
