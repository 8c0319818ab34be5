"""Which grammar engine: compile time and token-mask time per token for llguidance, xgrammar and outlines-core
on one tokenizer (SmolLM2's 49,152 tokens by default), over the same JSON schemas and the same walk.

Each schema is walked token by token: compute the mask, pick the allowed token with the highest of a fixed
seeded random logit row, advance; up to --steps tokens or until the grammar is finished. A random walk spends
most of its tokens inside free strings and numbers, where masks are widest (the expensive case). Batch 16 is
16 independent matchers filling one [16, V/32] bitmask, sequentially (and in parallel where the library can).

    python scripts/bench_grammar_libs.py                   # prints JSON; --out writes it too
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0},
                                                  "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}},
                 "required": ["id", "email"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4},
        "score": {"type": "number"}}, "required": ["user", "tags", "score"]},
    "free_text": {"type": "object", "properties": {"summary": {"type": "string"},
                                                   "points": {"type": "array", "items": {"type": "string"}}},
                  "required": ["summary", "points"]},
}


class Library:
    """One grammar engine: build its tokenizer once, compile a schema, make a matcher, fill one mask row."""

    name = ""

    def __init__(self, tokenizer, vocab_size: int):
        raise NotImplementedError

    def compile(self, schema: dict): ...
    def matcher(self, compiled): ...
    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None: ...
    def advance(self, matcher, token: int) -> None: ...
    def finished(self, matcher) -> bool: ...
    def fill_batch(self, matchers: list, bitmask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            self.fill(m, bitmask, i)


class Llguidance(Library):
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.lib, self.torch = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile(self, schema):
        grammar = self.lib.LLMatcher.grammar_from_json_schema(schema)
        return self.lib.LLMatcher(self.tokenizer, grammar, log_level=0)  # compiling happens here; copies reuse it

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask, row):
        self.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def advance(self, matcher, token):
        assert matcher.consume_token(token), matcher.get_error()

    def finished(self, matcher):
        return matcher.is_stopped()



class Xgrammar(Library):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar
        self.lib = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        return self.lib.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask, row):
        matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, matcher, token):
        assert matcher.accept_token(token)

    def finished(self, matcher):
        return matcher.is_terminated()


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tokenizer, vocab_size: int):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
        self.lib, self.to_regex = outlines_core, build_regex_from_schema
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        eos = tokenizer.eos_token_id
        tokens: dict[bytes, list[int]] = {}
        for text, token_id in tokenizer.get_vocab().items():
            if token_id != eos and token_id not in tokenizer.all_special_ids:
                tokens.setdefault(bytes(byte_of.get(c, 0) for c in text), []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)

    def compile(self, schema):
        return self.lib.Index(self.to_regex(json.dumps(schema)), self.vocabulary)

    def matcher(self, compiled):
        return self.lib.Guide(compiled)

    def fill(self, matcher, bitmask, row):
        view = bitmask[row]
        matcher.write_mask_into(view.data_ptr(), view.numel(), view.element_size())

    def advance(self, matcher, token):
        matcher.advance(token)

    def finished(self, matcher):
        return matcher.is_finished()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: byte -> the character its token strings use for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


LIBRARIES: list[type[Library]] = [Llguidance, Xgrammar, OutlinesCore]


def allowed_argmax(bitmask_row: torch.Tensor, logits: torch.Tensor) -> int:
    """The allowed token with the highest logit."""
    bits = (bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [V/32, 32]
    allowed = bits.flatten()[: logits.numel()].bool()
    return int(torch.where(allowed, logits, float("-inf")).argmax())


def walk(lib: Library, compiled, logits: torch.Tensor, batch: int) -> list[float]:
    """Seconds per mask fill over one walk, for `batch` matchers walking in lockstep (all take the same tokens)."""
    matchers = [lib.matcher(compiled) for _ in range(batch)]
    bitmask = torch.full((batch, (logits.shape[1] + 31) // 32), -1, dtype=torch.int32)
    times = []
    for row in logits:
        if lib.finished(matchers[0]):
            break
        start = time.perf_counter()
        lib.fill_batch(matchers, bitmask) if batch > 1 else lib.fill(matchers[0], bitmask, 0)
        times.append(time.perf_counter() - start)
        token = allowed_argmax(bitmask[0], row)
        for m in matchers:
            lib.advance(m, token)
    return times


def timed(fn: Callable):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench(cls: type[Library], tokenizer, vocab: int, steps: int, seed: int) -> dict:
    lib, init_s = timed(lambda: cls(tokenizer, vocab))
    logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(seed))
    report = {"tokenizer_init_s": init_s, "schemas": {}}
    for name, schema in SCHEMAS.items():
        compiled, compile_s = timed(lambda: lib.compile(schema))
        one, sixteen = walk(lib, compiled, logits, 1), walk(lib, compiled, logits, 16)
        report["schemas"][name] = {
            "compile_s": compile_s, "tokens": len(one),
            "mask_us_per_token_b1": 1e6 * statistics.mean(one), "mask_us_p99_b1": 1e6 * sorted(one)[int(.99 * len(one))],
            "mask_us_per_step_b16": 1e6 * statistics.mean(sixteen),
        }
    for key in ("mask_us_per_token_b1", "mask_us_per_step_b16", "compile_s"):
        report[f"mean_{key}"] = statistics.mean(s[key] for s in report["schemas"].values())
    report["coverage"] = coverage(lib)
    return report


def coverage(lib: Library) -> dict:
    """Which schemas of the test suite (tests/schema_suite.py) the library compiles, and why not the others."""
    from tests.schema_suite import SCHEMAS as SUITE
    failed = {}
    for name, schema in SUITE.items():
        try:
            compiled = lib.compile(schema)
            if getattr(compiled, "is_error", lambda: False)():
                failed[name] = compiled.get_error()[:200]
        except Exception as exc:  # noqa: BLE001 - a library's refusal is what we are measuring
            failed[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return {"compiled": len(SUITE) - len(failed), "of": len(SUITE), "failed": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from helix_serve.model.loader import load_tokenizer
    tokenizer = load_tokenizer(args.model)
    vocab = len(tokenizer)
    results = {"model": args.model, "vocab_size": vocab, "libraries": {}}
    for cls in LIBRARIES:
        try:
            results["libraries"][cls.name] = bench(cls, tokenizer, vocab, args.steps, args.seed)
        except ImportError as exc:
            results["libraries"][cls.name] = {"unavailable": str(exc)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
