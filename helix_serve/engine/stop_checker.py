"""Append accepted tokens one by one, ending the sequence exactly at EOS, a stop token, a stop string,
max_tokens or the context limit, so nothing after the stop reaches token ids, text or counts.

The text grows incrementally (detokenizer.py): a step decodes only around its new tokens, and stop strings
are searched in the held-back tail plus the new text only. That is enough: text is handed out only once no
stop string can start in it, so a stop string the new text completes starts inside the held tail.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from helix_serve.engine.logprobs import TokenLogprob
from helix_serve.engine.sequence import Sequence


class StopChecker:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def append(self, seq: Sequence, token_ids: list[int], logprobs: list[TokenLogprob] | None = None) -> int:
        """Append tokens until one ends the sequence; returns how many were kept. With `logprobs` (one per
        token), each kept token's entry gets its text: what it added to the output text."""
        params = seq.params
        per_token = bool(params.stop) or logprobs is not None  # else the step's tokens are decoded at once
        kept = 0
        for kept, token_id in enumerate(token_ids, start=1):
            if logprobs is not None:
                self._name_alternatives(seq, logprobs[kept - 1])
            seq.token_ids.append(token_id)
            if per_token:
                new_text = seq.text.detokenizer.step(self.tokenizer, seq.token_ids)
                if logprobs is not None:
                    self._name(logprobs[kept - 1], new_text)
                if self._add_text(seq, new_text):
                    return kept
            if token_id in params.stop_token_ids or (token_id in self.eos_token_ids and not params.ignore_eos):
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason:
                break
        if not per_token:
            self._add_text(seq, seq.text.detokenizer.step(self.tokenizer, seq.token_ids))
        if seq.finish_reason:
            rest = self.flush(seq)
            if logprobs is not None and kept:  # an unfinished character at the very end: its '\ufffd'
                self._name(logprobs[kept - 1], logprobs[kept - 1].token + rest)
        return kept

    def flush(self, seq: Sequence) -> str:
        """The sequence has finished: all its text is final, held parts and an unfinished character at the
        end included (as '\ufffd', as decoding the whole output shows it). Returns what the flush decoded."""
        text = seq.text
        if text.closed:
            return ""
        rest = text.detokenizer.step(self.tokenizer, seq.token_ids, final=True)
        text.ready += text.held + rest
        text.held, text.closed = "", True
        return rest

    def _add_text(self, seq: Sequence, new_text: str) -> bool:
        """Add decoded text; True when it completed a stop string (the text is cut before the first one)."""
        text, stops = seq.text, seq.params.stop
        if not stops:
            text.ready += new_text
            return False
        tail = text.held + new_text
        hits = [i for i in (tail.find(s) for s in stops) if i >= 0]
        if hits:
            text.ready += tail[: min(hits)]
            text.held, text.closed = "", True
            seq.finish_reason = "stop"
            return True
        held = max([0] + [n for s in stops for n in range(1, len(s)) if tail.endswith(s[:n])])
        text.ready += tail[: len(tail) - held]
        text.held = tail[len(tail) - held :]
        return False

    def _name_alternatives(self, seq: Sequence, logprob: TokenLogprob) -> None:
        """The text of each alternative at this position: what it would have added after the tokens so far."""
        if logprob.top:
            ids = [i for i, _ in logprob.top]
            logprob.top_tokens = seq.text.detokenizer.candidates(self.tokenizer, seq.token_ids, ids)

    @staticmethod
    def _name(logprob: TokenLogprob, text: str) -> None:
        """The token's text; its own entry among the alternatives says the same."""
        logprob.token = text
        logprob.top_tokens = [text if i == logprob.token_id else alternative
                              for (i, _), alternative in zip(logprob.top, logprob.top_tokens)]
