"""Log-probabilities of the emitted tokens, for requests that ask for them.

Taken from the target's verify pass (never the draft), as log_softmax of its raw logits: before
penalties, bias, temperature and truncation (vLLM's default, "raw logprobs"). An accepted draft token
and a recovered or bonus token are reported alike: the target's log-probability of that token at that
position. Only the emitted positions of the requests that ask are computed.

Token texts are filled in on the engine thread as the tokens are appended (stop_checker.py): a token's
text is what it added to the output text, so the texts concatenate to it (a token that ends inside a
UTF-8 character adds '' and the next one adds the character); an alternative's is what it would have added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class TokenLogprob:
    """The target's log-probability of one emitted token, and of the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the `logprobs` most likely tokens, most likely first
    token: str = ""  # its text: what it added to the output text
    top_tokens: list[str] = field(default_factory=list)  # the text of each of `top`


def emitted_logprobs(logits: torch.Tensor, first_rows: list[int], emitted: list[list[int]],
                     num_top: list[int | None]) -> list[list[TokenLogprob] | None]:
    """Per sequence: its emitted tokens' logprobs, or None where `num_top` is None (not asked).

    Args:
        logits: [R, V] the target's raw logits of the step, sequences' positions one after another.
        first_rows: the row of each sequence's first position; its emitted token j is scored at row + j.
        emitted: each sequence's emitted tokens (accepted drafts, then the recovered or bonus token).
        num_top: each sequence's number of alternatives to report, or None.
    """
    wanted = [i for i, n in enumerate(num_top) if n is not None]
    if not wanted:
        return [None] * len(emitted)
    rows = torch.tensor([first_rows[i] + j for i in wanted for j in range(len(emitted[i]))], device=logits.device)
    ids = torch.tensor([t for i in wanted for t in emitted[i]], device=logits.device)
    log_probs = logits[rows].float().log_softmax(dim=-1)  # [E, V]
    chosen = log_probs.gather(1, ids[:, None]).squeeze(1).tolist()  # [E]
    top_values, top_ids = log_probs.topk(max(num_top[i] for i in wanted), dim=-1)  # [E, max top]
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    out: list[list[TokenLogprob] | None] = [None] * len(emitted)
    e = 0
    for i in wanted:
        n = num_top[i]
        out[i] = [TokenLogprob(t, chosen[e + j], list(zip(top_ids[e + j][:n], top_values[e + j][:n])))
                  for j, t in enumerate(emitted[i])]
        e += len(emitted[i])
    return out
