"""Structured outputs in the engine: every output of the schema suite parses and validates, speculation (draft
model, prompt lookup, hybrid) emits exactly what plain constrained decoding emits, and sampled output follows
the masked target's distribution. Tiny random models: the constraint, not the model, guarantees validity."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
import torch

from helix_serve.engine.llm_engine import RequestRejectedError
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.engine.structured.constraint import Constraint, ConstraintError
from helix_serve.engine.structured.grammar import GrammarCompiler
from helix_serve.engine.structured.masks import unpack
from tests.helpers import PROMPTS, make_engine
from tests.schema_suite import SCHEMAS

MAX_TOKENS = 200  # bytes of multi-byte characters are a token each: a random model can spend many
CONSTRAINTS = {
    "json_schema": Constraint.json_schema(SCHEMAS["mixed_record"]),
    "json_object": Constraint("json_object"),
    "regex": Constraint("regex", r"(the|a) (quick|lazy) [a-z]{2,6}( [a-z]{1,4}){0,3}\."),
    "choice": Constraint.choice(["the quick brown fox", "the lazy dog", "paged attention", "def add(a, b)"]),
    "lark": Constraint("grammar", 'start: "def " NAME "(" NAME ", " NAME "):"\nNAME: /[a-z]{1,5}/'),
    "gbnf": Constraint("grammar", 'root ::= ("yes" | "no") " because " [a-z]{2,8} "."'),
}


@pytest.fixture(scope="module")
def engine(llama_pair):
    return make_engine(llama_pair, num_speculative_tokens=None)


def _texts(engine, constraint: Constraint, **settings) -> list:
    params = SamplingParams(max_tokens=MAX_TOKENS, structured=constraint, **settings)
    return engine.generate(PROMPTS[:4], params)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_output_parses_and_validates(engine, name):
    schema = SCHEMAS[name]
    for settings in ({}, {"temperature": 1.0}):
        for out in _texts(engine, Constraint.json_schema(schema), **settings):
            assert out.finish_reason == "stop", (out.text, out.error)
            jsonschema.validate(json.loads(out.text), schema)
    assert engine.kv_usage()["used_blocks"] == 0


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_speculation_emits_exactly_plain_constrained_greedy(engine, name):
    constraint = CONSTRAINTS[name]
    plain = [o.token_ids for o in _texts(engine, constraint, speculative=False)]
    drafted = {}
    for method in ("draft", "ngram", "hybrid"):
        for k in (3, None):
            outputs = _texts(engine, constraint, speculative_method=method, num_speculative_tokens=k)
            assert [o.token_ids for o in outputs] == plain, (method, k)
            for o in outputs:
                for proposer, counts in o.stats["by_proposer"].items():
                    drafted[proposer] = drafted.get(proposer, 0) + counts["num_drafted"]
    assert drafted.get("draft", 0) > 0  # speculation really ran; prompt lookup too where outputs repeat themselves
    assert drafted.get("ngram", 0) > 0 or name == "choice"


def test_regex_and_choice_outputs_match(engine):
    import re
    for out in _texts(engine, CONSTRAINTS["regex"], temperature=1.0):
        assert re.fullmatch(CONSTRAINTS["regex"].spec, out.text), out.text
    for out in _texts(engine, CONSTRAINTS["choice"], temperature=1.0):
        assert out.text in CONSTRAINTS["choice"].choices


def test_prompt_lookup_proposals_are_cut_where_the_grammar_forbids(engine):
    # After "the", prompt lookup proposes " quick brown fox ..." from the prompt; the grammar wants digits after
    # "the quick ".
    prompt = "the quick brown fox the quick brown fox the quick"
    constraint = Constraint("regex", "the quick [0-9]{20}")
    engine.add_request(prompt, SamplingParams(max_tokens=30, structured=constraint, speculative_method="ngram"), "cut")
    seq = engine.seqs["cut"]
    cuts = []
    while "cut" in engine.seqs and seq.num_output_tokens < 6:  # through "the quick ", where the cut must happen
        engine.step()
        raw = engine.ngram.propose([seq], 8)[0]
        planned = engine._plan()["cut"].options.ngram_tokens if "cut" in engine.seqs else []
        assert planned == raw[: len(planned)] and seq.grammar.valid_prefix(planned) == len(planned)
        cuts.append(len(raw) - len(planned))
    assert any(cuts), cuts  # lookup proposed the prompt's "brown fox ..." somewhere, and the grammar cut it
    engine.abort_request("cut")


def test_a_constraint_longer_than_max_tokens_ends_with_length(engine):
    [out] = engine.generate(["the"], SamplingParams(max_tokens=5, structured=Constraint("regex", "a{40}")))
    assert out.finish_reason == "length" and out.text == "a" * len(out.text) and len(out.token_ids) == 5


def test_invalid_constraints_are_refused_naming_the_problem(engine):
    cases = {Constraint("regex", "a(b"): "unclosed group", Constraint.json_schema({"type": "objectx"}): "objectx",
             Constraint("grammar", "start: missing_rule"): "missing_rule",
             Constraint.json_schema({"type": "integer", "minimum": "low"}): "invalid JSON schema: 'low'"}
    for constraint, words in cases.items():
        with pytest.raises(RequestRejectedError, match=words):
            engine.add_request("the", SamplingParams(structured=constraint))
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(structured=Constraint("json_object"), ignore_eos=True)
    assert not engine.seqs


def test_each_distinct_constraint_compiles_once(engine):
    grammars = engine.grammars
    grammars._cache.clear()
    for _ in range(3):
        grammars.compile(Constraint("regex", "[0-9]+"))
    grammars.compile(Constraint("regex", "[a-z]+"))
    assert list(grammars._cache) == [Constraint("regex", "[0-9]+"), Constraint("regex", "[a-z]+")]


def test_a_constraint_that_compiles_too_long_is_refused_and_never_waited_on_again(engine):
    """llguidance takes seconds (quadratic in the rules) to report an undefined rule at the end of a long chain:
    the caller waits `timeout_s`, then it and every later request for it are refused at once."""
    compiler = GrammarCompiler(engine.tokenizer, engine.grammars.vocab_size, set(engine.stop_checker.eos_token_ids),
                               timeout_s=0.3)
    rules = 800
    slow = Constraint("grammar", "start: " + " ".join(f"r{i}" for i in range(rules)) + "\n"
                      + "\n".join(f'r{i}: "a" r{i + 1}?' for i in range(rules)))
    for _ in range(2):
        start = time.perf_counter()
        with pytest.raises(ConstraintError, match="did not compile within 0.3 s"):
            compiler.compile(slow)
        waited = time.perf_counter() - start
        assert waited < 3.0, waited
    assert waited < 0.1, waited  # the second request: refused without waiting
    assert compiler.compile(Constraint("regex", "[0-9]+")).valid_prefix([]) == 0  # other constraints still compile


def _masked_target_strings(engine, prompt: str, constraint: Constraint, temperature: float) -> dict[str, float]:
    """Exact probability of every output string under constrained sampling from the target alone: walk every
    token path the grammar allows, each step's distribution the masked, tempered target's."""
    model, tokenizer = engine.pair.target.hf_model, engine.tokenizer
    prompt_ids = tokenizer(prompt).input_ids
    eos = engine.stop_checker.eos_token_ids
    result: dict[str, float] = {}

    def walk(path: list[int], prob: float) -> None:
        matcher = engine.grammars.compile(constraint)
        assert matcher.advance(path)
        bitmask = torch.zeros(1, (model.config.vocab_size + 31) // 32, dtype=torch.int32)
        matcher.fill(bitmask, 0)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + path], device=model.device)).logits[0, -1].float().cpu()
        logits = logits.masked_fill(~unpack(bitmask, logits.shape[-1])[0], float("-inf"))
        probs = (logits / temperature).softmax(-1)
        for token in probs.nonzero().flatten().tolist():
            if token in eos:
                text = tokenizer.decode(path)
                result[text] = result.get(text, 0.0) + prob * float(probs[token])
            else:
                walk(path + [token], prob * float(probs[token]))

    walk([], 1.0)
    return result


def _assert_follows(outputs: list, expected: dict[str, float]) -> None:
    """Chi-square test of the output texts' counts against their exact probabilities (p > 1e-3)."""
    counts = {text: 0 for text in expected}
    for out in outputs:
        counts[out.text] += 1
    observed = torch.tensor([counts[t] for t in expected], dtype=torch.float64)
    wanted = len(outputs) * torch.tensor(list(expected.values()), dtype=torch.float64)
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    p_value = float(torch.special.gammaincc(torch.tensor((len(expected) - 1) / 2), torch.tensor(chi2 / 2)))
    assert p_value > 1e-3, (counts, expected)


def test_sampled_constrained_output_follows_the_masked_target(llama_pair):
    """Chi-square of 1,200 speculative samples (draft model and prompt lookup, K = 3) against the exact
    distribution of masked target-only sampling, enumerated over every token path."""
    engine = make_engine(llama_pair, num_speculative_tokens=3, speculative_method="hybrid", max_num_seqs=64)
    prompt, constraint, temperature = "the quick brown fox", Constraint("regex", "[ab]{3}"), 1.5
    expected = _masked_target_strings(engine, prompt, constraint, temperature)
    assert len(expected) == 8 and abs(sum(expected.values()) - 1.0) < 1e-4
    n = 1200
    outputs = engine.generate([prompt] * n, SamplingParams(max_tokens=8, temperature=temperature,
                                                           structured=constraint))
    assert sum(o.stats["num_drafted"] for o in outputs) > n  # speculation really ran
    _assert_follows(outputs, expected)


def test_grammar_forced_tokens_are_drafted_free_and_exact(engine):
    """Keys, brackets and separators the schema forces are proposed by the grammar itself (every method uses
    them): same greedy tokens as plain decoding, fewer target steps, counted as the `grammar` proposer."""
    constraint = Constraint.json_schema(SCHEMAS["nested_object"])
    plain = _texts(engine, constraint, speculative=False)
    forced = _texts(engine, constraint, speculative_method="ngram", num_speculative_tokens=None)
    assert [o.token_ids for o in forced] == [o.token_ids for o in plain]
    for out, base in zip(forced, plain):
        grammar = out.stats["by_proposer"]["grammar"]
        assert grammar["num_drafted"] >= len(engine.tokenizer('{"user": {"id": ').input_ids) - 1
        assert grammar["num_accepted"] > 0
        assert out.stats["num_target_steps"] < base.stats["num_target_steps"]
    # seeded sampled requests never take given proposals (their tokens must not depend on the proposer)
    [seeded] = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=MAX_TOKENS, structured=constraint, seed=3,
                                                          temperature=1.0, speculative_method="ngram"))
    assert "grammar" not in seeded.stats["by_proposer"]


def test_sampled_output_with_forced_tokens_follows_the_masked_target(llama_pair):
    """Chi-square, as above, where the grammar forces "xyz" between two free characters: the forced tokens are
    given proposals (one-hot q) and the output still follows masked target-only sampling."""
    engine = make_engine(llama_pair, num_speculative_tokens=None, speculative_method="ngram", max_num_seqs=64)
    prompt, constraint, temperature = "the quick brown fox", Constraint("regex", "[ab]xyz[ab]"), 1.5
    expected = _masked_target_strings(engine, prompt, constraint, temperature)
    assert len(expected) == 4 and abs(sum(expected.values()) - 1.0) < 1e-4
    n = 800
    outputs = engine.generate([prompt] * n, SamplingParams(max_tokens=12, temperature=temperature,
                                                           structured=constraint))
    assert sum(o.stats["by_proposer"].get("grammar", {}).get("num_drafted", 0) for o in outputs) >= n
    _assert_follows(outputs, expected)
