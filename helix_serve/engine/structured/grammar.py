"""The grammar engine behind structured outputs: the only module that imports it (llguidance; README,
"Structured outputs", says why), so swapping the library means rewriting this file alone.

A `Constraint` becomes a grammar (`grammar_text`), a grammar plus the tokenizer becomes a compiled `Matcher`
(`GrammarCompiler.compile`, cached per distinct constraint), and each request advances its own copy of it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import jsonschema
import llguidance
import llguidance.hf
import llguidance.torch
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark

from helix_serve.engine.structured.constraint import Constraint, ConstraintError

# Compact JSON with the separators models see most ("a, b", "k: v"): no free whitespace to wander into.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compilation is refused past these (llguidance's defaults are 500k symbols and 1M lexer fuel).
LIMITS = dict(max_grammar_size=200_000, initial_lexer_fuel=1_000_000, max_lexer_states=100_000)
CACHE_SIZE = 64  # compiled constraints kept (least recently used dropped first)
COMPILE_TIMEOUT_S = 10.0  # a constraint that takes longer to compile is refused
COMPILE_THREADS = 2


def _refused(error: ConstraintError) -> Future:
    refusal: Future = Future()
    refusal.set_exception(error)
    return refusal


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS)


def grammar_text(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar (Lark syntax or llguidance's JSON form)."""
    kind = constraint.kind
    if kind in ("json_schema", "json_object"):
        return llguidance.LLMatcher.grammar_from_json_schema(constraint.schema, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.spec)
    if kind == "choice":  # Lark string literals take JSON's escapes
        return "start: " + " | ".join(json.dumps(c) for c in constraint.choices)
    if "::=" in constraint.spec:  # GBNF (llama.cpp, xgrammar's EBNF); otherwise Lark, llguidance's own
        try:
            return gbnf_to_lark(constraint.spec)
        except Exception as exc:  # noqa: BLE001 - the converter raises several types for bad input
            raise ConstraintError(f"invalid grammar: {exc}") from exc
    return constraint.spec


def _check_schema(constraint: Constraint) -> None:
    """A JSON schema must be one by the JSON Schema meta-schema (llguidance checks only what it compiles)."""
    if constraint.kind == "json_schema":
        schema = constraint.schema
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ConstraintError(f"invalid JSON schema: {exc.message}") from exc


@dataclass(slots=True)
class Matcher:
    """One request's position in its grammar. Consuming a token the grammar forbids is an error the matcher
    never leaves, so callers check the mask (or `valid_prefix`) before `advance`."""

    inner: llguidance.LLMatcher

    def fork(self) -> Matcher:
        """An independent copy (under a microsecond): draft positions advance copies, never the original."""
        return Matcher(self.inner.deep_copy())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of an int32 [N, ceil(V/32)] CPU bitmask."""
        llguidance.torch.fill_next_token_bitmask(self.inner, bitmask, row)

    def advance(self, token_ids: list[int]) -> bool:
        """Consume tokens; False (and `error` set) if the grammar forbids one."""
        # NOTE: one at a time: llguidance 1.9's consume_tokens refuses end-of-sequence once the grammar has
        # stopped, which consume_token accepts.
        return all(self.inner.consume_token(t) for t in token_ids) and not self.inner.is_error()

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of these tokens the grammar accepts in a row from here (nothing is consumed)."""
        return self.inner.validate_tokens(token_ids) if token_ids else 0

    def forced_tokens(self) -> list[int]:
        """The tokens the grammar forces next (its only continuation, canonically tokenized); [] if none."""
        return [] if self.inner.is_stopped() else self.inner.compute_ff_tokens()

    @property
    def error(self) -> str:
        return self.inner.get_error().strip().split("\n")[0]  # the first line; the rest dumps parser state

    @property
    def finished(self) -> bool:
        """Only end-of-sequence can follow."""
        return self.inner.is_stopped()


class GrammarCompiler:
    """Compiles constraints against one tokenizer, each distinct constraint once (an LRU cache of results,
    refusals included, so a bad constraint is never compiled twice); thread-safe, so the serving layer can
    compile ahead of admission off the engine thread.

    Compiling runs on the compiler's own threads (llguidance releases the GIL) and a caller waits at most
    `timeout_s`: a constraint that takes longer is refused from then on. Its compilation cannot be interrupted
    and finishes in the background (llguidance's own limits bound it), on one of `COMPILE_THREADS` threads.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], cache_size: int = CACHE_SIZE,
                 timeout_s: float = COMPILE_TIMEOUT_S):
        self._hf_tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use: ~1 s for a 49k vocabulary
        self._cache: OrderedDict[Constraint, Future] = OrderedDict()  # each a compiled template or a refusal
        self._cache_size, self.timeout_s = cache_size, timeout_s
        self._lock = threading.Lock()  # guards the cache and the tokenizer, never held while compiling
        self._threads = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="helix-grammar")

    def compile(self, constraint: Constraint) -> Matcher:
        """A fresh matcher at the start of the constraint; raises ConstraintError if it cannot compile, or
        not within `timeout_s`."""
        with self._lock:
            result = self._cache.get(constraint)
            if result is None:
                result = self._cache[constraint] = self._threads.submit(self._compile, constraint)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(constraint)
        try:
            template = result.result(timeout=self.timeout_s)
        except FutureTimeout:
            refusal = ConstraintError(f"the {constraint.kind.replace('_', ' ')} constraint did not compile within "
                                      f"{self.timeout_s:g} s; simplify it")
            with self._lock:  # later requests for it are refused at once, never waited on again
                if self._cache.get(constraint) is result:
                    self._cache[constraint] = _refused(refusal)
            raise refusal from None
        return Matcher(template.deep_copy())

    def _compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        _check_schema(constraint)
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self._eos)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar_text(constraint), log_level=0, limits=_limits())
        if matcher.is_error():
            raise ConstraintError(f"invalid {constraint.kind.replace('_', ' ')}: {matcher.get_error().strip()}")
        return matcher
