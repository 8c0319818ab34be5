"""Logits → the distribution actually sampled from, and sampling from it.

The same `logits_to_probs` is applied to draft and target logits, so the rejection sampler compares
the distributions that were really used (temperature, then min-p, then top-k and top-p, in vLLM's order;
penalties and logit bias come before, in logits_processors.py). Greedy rows become one-hot
distributions, which makes greedy a special case of the same rejection rule (accept iff argmaxes agree).

Randomness is indexed by output position: the uniform a request uses at position i for a given purpose
(draw a draft token, test it, draw the emitted token) is a fixed function of (seed, i, purpose), not the
next draw of a running stream, so it does not depend on how many draws earlier steps made (their K),
on batch mates, or on preemption.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

import torch

from helix_serve.engine.sampling_params import SamplingParams


class Purpose(enum.IntEnum):
    """What a position's uniform is for; each purpose has its own independent uniform."""

    DRAFT = 0  # sample the draft's proposal for this position from q
    ACCEPT = 1  # test that proposal against p
    FINAL = 2  # draw the emitted token (from p, or from the residual after a rejection)


def position_uniform(seed: int, position: int, purpose: Purpose) -> float:
    """A uniform in (0, 1] fixed by (seed, position, purpose): a counter-based stream (a hash of the
    counter), the same on every device and for any integer seed."""
    digest = hashlib.blake2b(f"{seed}/{position}/{int(purpose)}".encode(), digest_size=8).digest()
    return ((int.from_bytes(digest, "little") >> 11) + 1) / 2.0**53  # 53 random bits, never 0


def sampling_row(params: SamplingParams, vocab_size: int) -> tuple[float, int, float, float]:
    """(temperature, top_k, top_p, min_p) as the sampler uses them: temperature 0 for greedy requests
    (see SamplingParams.greedy), top_k at most the vocabulary (a larger one keeps every token)."""
    temperature = 0.0 if params.greedy else float(params.temperature)
    return temperature, min(int(params.top_k), vocab_size), float(params.top_p), float(params.min_p)


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling settings, [N] each."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor

    @classmethod
    def from_rows(cls, rows: list[tuple[float, int, float, float]], device: torch.device) -> SamplingTensors:
        temperature, top_k, top_p, min_p = zip(*rows) if rows else ((), (), (), ())
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            min_p=torch.tensor(min_p, dtype=torch.float32, device=device),
        )

    @classmethod
    def from_params(cls, params: list[SamplingParams], device: torch.device, vocab_size: int) -> SamplingTensors:
        return cls.from_rows([sampling_row(p, vocab_size) for p in params], device)

    def select(self, rows: torch.Tensor) -> SamplingTensors:
        rows = rows.to(self.temperature.device)
        return SamplingTensors(self.temperature[rows], self.top_k[rows], self.top_p[rows], self.min_p[rows])


TOP_CANDIDATES = 1024  # the most likely tokens a top-k/top-p row sorts first (the whole vocabulary only if needed)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k, then outside its top-p nucleus (the top token always stays).

    Sorting the whole vocabulary costs more than the rest of a sampled step, so only the TOP_CANDIDATES most
    likely tokens are sorted (topk) when every row's kept tokens are sure to be among them: its top-k is, or
    their probability reaches its top-p (a later token then has at least top_p before it). Else all are sorted.
    """
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    width = min(vocab, TOP_CANDIDATES)
    sorted_logits, order = logits.topk(width, dim=-1)  # descending
    rank = torch.arange(width, device=logits.device)
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    # Each row's distribution over its whole top-k: the candidates' own when it is inside them, else the vocabulary's.
    log_total = torch.where(k <= width, sorted_logits.logsumexp(dim=-1), logits.logsumexp(dim=-1))
    probs = (sorted_logits - log_total[:, None]).exp()
    mass = probs.cumsum(dim=-1)
    if width < vocab and not bool(((k <= width) | ((k == vocab) & (mass[:, -1] >= top_p))).all()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        mass = probs.cumsum(dim=-1)
    sorted_logits = sorted_logits.masked_fill(mass - probs >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's most likely token's."""
    log_probs = logits.log_softmax(dim=-1)
    threshold = log_probs.max(dim=-1, keepdim=True).values + min_p.log()[:, None]  # log(min_p · p_max)
    return logits.masked_fill(log_probs < threshold, float("-inf"))


TRANSPOSED_ARGMAX_MAX_ROWS = 8  # up to here numpy's argmax reads the weight-major head's logits in place (`argmax`)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] → [N] each row's most likely token (the first one on ties, like torch.argmax). On the CPU this is
    numpy's argmax: torch's CPU argmax is not vectorised and costs ~25x more over a 49k-token vocabulary.
    The weight-major LM head's logits are a transposed view (paged_llm.linear). Over 49,152 × N, numpy's argmax
    of its columns in place against torch's row-major copy plus a row-wise argmax (2-vCPU Xeon): 0.07 vs 0.23 ms at
    4 rows, 0.26 vs 0.38 at 8, 1.84 vs 0.74 at 16, 4.08 vs 1.26 at 28; the in-place argmax was ~3 % of a
    16-stream int4 decode step (docs/BENCHMARKS.md §7)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return logits.argmax(dim=-1)
    if logits.t().is_contiguous() and logits.shape[0] <= TRANSPOSED_ARGMAX_MAX_ROWS:
        return torch.from_numpy(logits.t().numpy().argmax(axis=0))
    return torch.from_numpy(logits.contiguous().numpy().argmax(axis=-1))


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(-1, argmax(logits)[:, None], 1.0)


def logits_to_probs(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """[N, V] fp32 logits → [N, V] probabilities under each row's settings."""
    greedy = t.temperature == 0
    if bool(greedy.all()):  # the common greedy batch: skip the softmax entirely
        return _one_hot_argmax(logits)
    # Row-major first: the weight-major LM head's logits are a transposed view (paged_llm.linear), over which
    # the row-wise sort, softmax and cumsum below run much slower.
    scaled = logits.contiguous() / torch.where(greedy, 1.0, t.temperature)[:, None]
    if bool((t.min_p > 0).any()):
        scaled = _min_p(scaled, t.min_p)
    if bool((t.top_k > 0).any()) or bool((t.top_p < 1).any()):
        scaled = _top_k_top_p(scaled, t.top_k, t.top_p)
    probs = scaled.softmax(dim=-1)
    if bool(greedy.any()):
        probs = torch.where(greedy[:, None], _one_hot_argmax(logits), probs)
    return probs


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform in (0, 1] per row picks one token. [N, V], [N] → [N]."""
    cdf = probs.cumsum(dim=-1)
    targets = (uniforms.to(probs.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, targets).squeeze(-1).clamp(max=probs.shape[-1] - 1)
