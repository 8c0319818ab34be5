"""Append accepted tokens one by one, ending the sequence exactly at EOS, a stop token, a stop string,
max_tokens or the context limit, so nothing after the stop reaches token ids, text or counts."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from helix_serve.engine.sequence import Sequence


class StopChecker:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def decode(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)

    def append(self, seq: Sequence, token_ids: list[int]) -> int:
        """Append tokens until one ends the sequence; returns how many were kept."""
        params = seq.params
        kept = 0
        for kept, token_id in enumerate(token_ids, start=1):
            seq.token_ids.append(token_id)
            if params.stop:
                checked = len(seq.output_text)
                seq.output_text = self.decode(seq)
                if self._hit_stop_string(seq, checked):
                    return kept
            if token_id in params.stop_token_ids or (token_id in self.eos_token_ids and not params.ignore_eos):
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason:
                break
        if not params.stop:
            seq.output_text = self.decode(seq)
        return kept

    @staticmethod
    def _hit_stop_string(seq: Sequence, checked: int) -> bool:
        """Truncate the text before the first stop string that the newest token completed."""
        text = seq.output_text
        start = max(0, checked - max(len(s) for s in seq.params.stop) - 4)  # only new text can complete one
        hits = [i for i in (text.find(s, start) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.output_text = text[: min(hits)]
        seq.finish_reason = "stop"
        return True

    @staticmethod
    def streamable_text_end(seq: Sequence) -> int:
        """How much of the text can be sent now: all of it once finished; before that, hold back an
        unfinished UTF-8 character and any suffix that could still grow into a stop string."""
        text = seq.output_text
        if seq.finish_reason:
            return len(text)
        end = len(text.rstrip("\ufffd"))
        held = 0
        for stop in seq.params.stop:
            held = max([held] + [n for n in range(1, len(stop)) if text.endswith(stop[:n], 0, end)])
        return end - held
