"""Modified rejection sampling (Leviathan et al. 2023; Chen et al. 2023), batched.

Draft token x at position i is accepted with probability min(1, p_i(x) / q_i(x)); at the first
rejection the replacement is drawn from norm(max(0, p_i − q_i)); if all drafts are accepted a bonus
token is drawn from p_{k+1}. The emitted tokens are then distributed exactly as the target's samples.

A row may instead have its position k+1 judged like the others: the draft proposes one token more than
the target verified, and that proposal is accepted with min(1, p_{k+1}/q_{k+1}) or replaced by a draw
from the residual, rather than drawing the bonus from p_{k+1}. Each position is then single-step
speculative sampling against q, which is just as exact, and every emitted token is made by the same rule
whatever k is (speculative.py uses this for seeded requests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_serve.engine.sampler import sample_from_probs


@dataclass(slots=True)
class RejectionResult:
    num_accepted: torch.Tensor  # [N] accepted (verified) draft tokens per row
    next_token_ids: torch.Tensor  # [N] recovered (after a rejection), bonus, or judged last token


def rejection_sample(
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    num_draft_tokens: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
    judge_last: torch.Tensor | None = None,
) -> RejectionResult:
    """Judge each row's drafts.

    Args:
        draft_token_ids: [N, D] proposals (entries past a row's own count are ignored).
        draft_probs: [N, D, V] distributions the proposals were sampled from.
        target_probs: [N, K+1, V] target distributions at the K verified draft positions and the one after
            (K + 1 >= D).
        num_draft_tokens: [N] each row's own K: proposals the target verified (0..K).
        accept_uniforms: [N, D] uniforms in (0, 1] for the accept tests.
        sample_uniforms: [N], or [N, K+1] with one per position (the emitted token's position picks it),
            uniforms in (0, 1] for the recovered or bonus token.
        judge_last: [N] bool, or None for none: rows whose proposal at column K_i is judged against
            p_{K_i+1} instead of drawing the bonus token from it.
    """
    num_rows, width = draft_token_ids.shape
    rows = torch.arange(num_rows, device=target_probs.device)
    final_uniforms = sample_uniforms.to(target_probs.device)
    if final_uniforms.dim() == 1:
        final_uniforms = final_uniforms[:, None].expand(num_rows, target_probs.shape[1])
    if width == 0:
        return RejectionResult(torch.zeros_like(rows), sample_from_probs(target_probs[:, 0], final_uniforms[:, 0]))

    judged = torch.zeros_like(rows, dtype=torch.bool) if judge_last is None else judge_last.to(rows.device)
    num_judged = num_draft_tokens.to(rows.device) + judged.long()  # proposals tested per row
    p = target_probs[:, :width].gather(-1, draft_token_ids.unsqueeze(-1)).squeeze(-1)  # [N, D]
    q = draft_probs.gather(-1, draft_token_ids.unsqueeze(-1)).squeeze(-1)  # [N, D]
    in_range = torch.arange(width, device=p.device)[None, :] < num_judged[:, None]
    passed = (accept_uniforms.to(p.device) * q < p) & in_range  # u < p/q without dividing by q
    num_passed = passed.long().cumprod(dim=-1).sum(dim=-1)  # length of the accepted prefix
    num_accepted = torch.minimum(num_passed, num_judged - judged.long())  # a judged last token is not a draft

    p_next = target_probs[rows, num_accepted]  # [N, V]
    q_next = draft_probs[rows, num_accepted.clamp(max=width - 1)]
    residual = (p_next - q_next).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_next)  # p == q: nothing to correct
    rejected = num_passed < num_judged
    drawn = sample_from_probs(torch.where(rejected[:, None], residual, p_next), final_uniforms[rows, num_accepted])
    last_proposal = draft_token_ids[rows, num_accepted.clamp(max=width - 1)]
    return RejectionResult(num_accepted, torch.where(judged & ~rejected, last_proposal, drawn))


def greedy_verify(draft_token_ids: torch.Tensor, target_token_ids: torch.Tensor,
                  num_draft_tokens: torch.Tensor) -> RejectionResult:
    """`rejection_sample` for greedy rows, whose p and q are one-hot on argmaxes: a draft passes iff it is
    the target's argmax (p(x)/q(x) is 1 or 0), and the token after the accepted prefix is the target's
    argmax there (the residual of two different one-hots is p's). No row is judged: judged rows sample.

    Args:
        draft_token_ids: [N, D] proposals (entries past a row's own count are ignored).
        target_token_ids: [N, K+1] the target's argmax at the K verified draft positions and the one after.
        num_draft_tokens: [N] each row's own K.
    """
    width = draft_token_ids.shape[1]
    in_range = torch.arange(width, device=draft_token_ids.device)[None, :] < num_draft_tokens[:, None]
    passed = (draft_token_ids == target_token_ids[:, :width]) & in_range
    num_accepted = passed.long().cumprod(dim=-1).sum(dim=-1)
    return RejectionResult(num_accepted, target_token_ids.gather(1, num_accepted[:, None]).squeeze(1))
