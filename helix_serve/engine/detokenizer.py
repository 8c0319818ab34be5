"""Incremental detokenization: a step decodes a few tokens around the new ones, never the whole output.

vLLM's scheme over token ids: `read_offset` is where the text so far ends, `prefix_offset` a few tokens
before it. The new text is decode(ids[prefix_offset:end]) minus decode(ids[prefix_offset:read_offset]):
decoding with some context keeps what decoding a token alone loses (a SentencePiece '▁' space, a
character whose UTF-8 bytes span several byte-level tokens). While the window ends inside a character
('\ufffd' at its end) it keeps those tokens and emits only the whole characters before it; the token that
completes the character emits it. The text so far is decode(output ids) minus its trailing '\ufffd's (an
unfinished character), as the engine streamed it when it decoded the whole output every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONTEXT = 5  # prompt tokens decoded before the first output token; also the most tokens adding nothing held
REPLACEMENT = "\ufffd"  # what decoding puts for bytes that are not (yet) a whole UTF-8 character


def decode(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True)


@dataclass(slots=True)
class Detokenizer:
    """One sequence's decoding window over its token ids (prompt included)."""

    prefix_offset: int
    read_offset: int
    num_ahead: int = 0  # characters already emitted from the tokens at read_offset and after (still pending)

    @classmethod
    def after_prompt(cls, num_prompt_tokens: int) -> Detokenizer:
        return cls(max(0, num_prompt_tokens - CONTEXT), num_prompt_tokens)

    def step(self, tokenizer: PreTrainedTokenizerBase, token_ids: list[int], final: bool = False) -> str:
        """The text the tokens appended since the last step add. While they end inside a character, the
        whole characters before it are emitted and the tokens stay in the window; all of it when `final`."""
        prefix_text = decode(tokenizer, token_ids[self.prefix_offset : self.read_offset])
        new_text = decode(tokenizer, token_ids[self.prefix_offset :])
        start = len(prefix_text) + self.num_ahead  # what this window has emitted already
        if not (final or self._complete(new_text, prefix_text, len(token_ids))):
            ahead = new_text.rstrip(REPLACEMENT)[start:]
            self.num_ahead += len(ahead)
            return ahead
        self.prefix_offset, self.read_offset, self.num_ahead = self.read_offset, len(token_ids), 0
        return new_text[start:]

    def _complete(self, new_text: str, prefix_text: str, end: int) -> bool:
        """Whether the window can move on: its text ends with a whole character, and it added some (a
        skipped special token adds none, and its context still matters to the next token, within reason)."""
        if new_text.endswith(REPLACEMENT) or len(new_text) < len(prefix_text):
            return False
        return len(new_text) > len(prefix_text) or end - self.read_offset >= CONTEXT

    def candidates(self, tokenizer: PreTrainedTokenizerBase, token_ids: list[int], ids: list[int]) -> list[str]:
        """The text each of `ids` would add after token_ids (an unfinished character shows as '\ufffd')."""
        window = token_ids[self.prefix_offset :]
        start = len(decode(tokenizer, token_ids[self.prefix_offset : self.read_offset])) + self.num_ahead
        return [decode(tokenizer, window + [i])[start:] for i in ids]


@dataclass(slots=True)
class SequenceText:
    """A sequence's output text, built from its new tokens only.

    The text is `sent` + `ready` + `held`: handed out already (in pieces, joined once at the end), ready
    for the next output, and held back because it could still grow into a stop string. `closed` once the
    text is final (a stop string cut it, or the sequence finished and the rest was flushed).
    """

    detokenizer: Detokenizer
    sent: list[str] = field(default_factory=list)
    ready: str = ""
    held: str = ""
    closed: bool = False

    @classmethod
    def after_prompt(cls, num_prompt_tokens: int) -> SequenceText:
        return cls(Detokenizer.after_prompt(num_prompt_tokens))

    def take(self) -> str:
        """What is ready now (it moves to `sent`)."""
        new, self.ready = self.ready, ""
        if new:
            self.sent.append(new)
        return new

    @property
    def text(self) -> str:
        return "".join(self.sent) + self.ready + self.held
