"""Modified rejection sampling (Leviathan et al. 2023; Chen et al. 2023), batched.

Draft token x at position i is accepted with probability min(1, p_i(x) / q_i(x)); at the first
rejection the replacement is drawn from norm(max(0, p_i − q_i)); if all drafts are accepted a bonus
token is drawn from p_{k+1}. The emitted tokens are then distributed exactly as the target's samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_serve.engine.sampler import sample_from_probs


@dataclass(slots=True)
class RejectionResult:
    num_accepted: torch.Tensor  # [N] accepted draft tokens per row
    next_token_ids: torch.Tensor  # [N] recovered (after a rejection) or bonus (all accepted) token


def rejection_sample(
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    num_draft_tokens: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> RejectionResult:
    """Judge each row's drafts.

    Args:
        draft_token_ids: [N, K] proposals (entries past a row's own count are ignored).
        draft_probs: [N, K, V] distributions the proposals were sampled from.
        target_probs: [N, K+1, V] target distributions at the K draft positions and the one after.
        num_draft_tokens: [N] each row's own K (0..K).
        accept_uniforms: [N, K] and sample_uniforms: [N], uniforms in (0, 1].
    """
    num_rows, max_k = draft_token_ids.shape
    rows = torch.arange(num_rows, device=target_probs.device)
    if max_k == 0:
        return RejectionResult(torch.zeros_like(rows), sample_from_probs(target_probs[:, 0], sample_uniforms))

    p = target_probs[:, :max_k].gather(-1, draft_token_ids.unsqueeze(-1)).squeeze(-1)  # [N, K]
    q = draft_probs.gather(-1, draft_token_ids.unsqueeze(-1)).squeeze(-1)  # [N, K]
    in_range = torch.arange(max_k, device=p.device)[None, :] < num_draft_tokens[:, None]
    accepted = (accept_uniforms.to(p.device) * q < p) & in_range  # u < p/q without dividing by q
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)  # length of the accepted prefix

    p_next = target_probs[rows, num_accepted]  # [N, V]
    q_next = draft_probs[rows, num_accepted.clamp(max=max_k - 1)]
    residual = (p_next - q_next).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_next)  # p == q: nothing to correct
    rejected = (num_accepted < num_draft_tokens)[:, None]
    return RejectionResult(num_accepted, sample_from_probs(torch.where(rejected, residual, p_next), sample_uniforms))
