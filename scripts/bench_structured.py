"""Structured outputs: JSON-schema generation with speculation ÷ plain constrained decoding (K=0), per method,
at batch 1 and 16, what the grammar costs per step, and whether every output validates.

Chat requests for JSON, each with its schema as the constraint (the real pair by default), of two kinds:
generative (describe, review, forecast: the values are the model's) and extraction (the values are in the
prompt). At batch 1 each task runs alone, per kind and all together; wider batches mix the kinds. Methods:
K=0 (speculation off: no proposer, the grammar only masks), `ngram` (prompt lookup + grammar-forced tokens),
`draft` (the draft model + forced tokens) and `hybrid` (all of them). Runs rotate the method order every round.
The grammar's time is everything the engine spends in the grammar library and its masks (compiling excluded:
the constraints are compiled before timing): masks of every scored position, forced-token lookup, advancing
the matcher; its share is of the engine's time at K=0 (a decode step).

    python scripts/bench_structured.py                 # real pair, ~10 min on 2 cores
    python scripts/bench_structured.py --quick         # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonschema
import torch
from bench_common import add_pair_args, save_figure, subplots
from bench_common import cpu_name
from tqdm import tqdm

from helix_serve.config import EngineConfig
from helix_serve.distill.data import chat_prompt_ids
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.engine.structured import grammar, masks
from helix_serve.engine.structured.constraint import Constraint

NAME = {"type": "string", "maxLength": 40}
TASKS = [
    ("Describe a fictional person as JSON: name, age, city and up to three hobbies.",
     {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                       "city": NAME, "hobbies": {"type": "array", "items": NAME, "maxItems": 3}},
      "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}),
    ("Review a coffee shop as JSON with a title, a rating from 1 to 5, and lists of pros and cons.",
     {"type": "object", "properties": {"title": NAME, "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                                       "pros": {"type": "array", "items": NAME, "maxItems": 3},
                                       "cons": {"type": "array", "items": NAME, "maxItems": 3}},
      "required": ["title", "rating", "pros", "cons"], "additionalProperties": False}),
    ("Give the weather forecast for Paris tomorrow as JSON.",
     {"type": "object", "properties": {"city": NAME, "temperature_celsius": {"type": "integer", "minimum": -50,
                                                                             "maximum": 60},
                                       "condition": {"enum": ["sunny", "cloudy", "rainy", "snowy", "windy"]},
                                       "chance_of_rain_percent": {"type": "integer", "minimum": 0, "maximum": 100}},
      "required": ["city", "temperature_celsius", "condition", "chance_of_rain_percent"],
      "additionalProperties": False}),
    ("List three countries in Europe with their capitals as JSON.",
     {"type": "object", "properties": {"countries": {"type": "array", "minItems": 3, "maxItems": 3, "items": {
         "type": "object", "properties": {"country": NAME, "capital": NAME},
         "required": ["country", "capital"], "additionalProperties": False}}},
      "required": ["countries"], "additionalProperties": False}),
]
STR = {"type": "string", "maxLength": 60}
# Extraction, the other everyday use of schemas: the values are in the prompt, so prompt lookup can draft them.
EXTRACTION = [
    ("Extract the contact as JSON.\n\nHi team, please welcome Maria Gonzalez, our new account manager. She works "
     "from the Madrid office and can be reached at maria.gonzalez@example.com or +34 612 345 678.",
     {"type": "object", "properties": {"name": STR, "email": STR, "phone": STR, "city": STR},
      "required": ["name", "email", "phone", "city"], "additionalProperties": False}),
    ("Extract the order as JSON.\n\nOrder A-10293 was placed on 2024-03-15 by John Smith for 2 Wireless Mouse at "
     "24.99 dollars each.",
     {"type": "object", "properties": {"order_id": STR, "date": STR, "customer": STR, "product": STR,
                                       "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                                       "unit_price": {"type": "number", "minimum": 0, "maximum": 1000}},
      "required": ["order_id", "date", "customer", "product", "quantity", "unit_price"],
      "additionalProperties": False}),
    ("Extract the meeting as JSON.\n\nThe budget review moves to Thursday at 3 pm in Room 204.",
     {"type": "object", "properties": {"meeting": NAME, "day": NAME, "time": NAME, "room": NAME},
      "required": ["meeting", "day", "time", "room"], "additionalProperties": False}),
    ("Extract the book as JSON.\n\nThe Midnight Library by Matt Haig was published in 2020 by Canongate Books; "
     "it has 304 pages and is a work of fiction.",
     {"type": "object", "properties": {"title": STR, "author": STR, "year": {"type": "integer", "minimum": 1000,
                                                                            "maximum": 2100},
                                       "publisher": STR, "pages": {"type": "integer", "minimum": 1,
                                                                   "maximum": 5000}, "genre": STR},
      "required": ["title", "author", "year", "publisher", "pages", "genre"], "additionalProperties": False}),
]
KINDS = {"generative": TASKS, "extraction": EXTRACTION}
METHODS = {"K=0": {"speculative": False}, "ngram": {"speculative_method": "ngram"},
           "draft": {"speculative_method": "draft"}, "hybrid": {"speculative_method": "hybrid"}}
SPEED_GOAL, MASK_GOAL = 2.0, 0.05


class GrammarClock:
    """Seconds spent in the grammar while installed: the mask builder, forced-token lookup, matcher advances."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._patched: list[tuple[object, str, object]] = []

    def __enter__(self) -> GrammarClock:
        for owner, name in ((masks.StepMasks, "apply"), (masks.StepMasks, "build"),
                            (grammar.Matcher, "forced_tokens"), (grammar.Matcher, "advance"),
                            (grammar.Matcher, "valid_prefix")):
            original = owner.__dict__[name]
            function = original.__func__ if isinstance(original, classmethod) else original

            def timed(*args, _function=function, **kwargs):
                start = time.perf_counter()
                try:
                    return _function(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(owner, name, classmethod(timed) if isinstance(original, classmethod) else timed)
            self._patched.append((owner, name, original))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in self._patched:
            setattr(owner, name, original)


def run(engine: LLMEngine, tasks: list[tuple[list[int], dict]], max_tokens: int, overrides: dict) -> dict:
    params = [SamplingParams(max_tokens=max_tokens, structured=Constraint.json_schema(schema), **overrides)
              for _, schema in tasks]
    with GrammarClock() as clock:
        start = time.perf_counter()
        outs = engine.generate([ids for ids, _ in tasks], params)
        seconds = time.perf_counter() - start
    valid = 0
    for out, (_, schema) in zip(outs, tasks):
        try:
            jsonschema.validate(json.loads(out.text), schema)
            valid += out.finish_reason == "stop"
        except (json.JSONDecodeError, jsonschema.ValidationError):
            pass
    by: dict[str, list[int]] = {}
    for o in outs:
        for name, c in o.stats["by_proposer"].items():
            slot = by.setdefault(name, [0, 0])
            slot[0], slot[1] = slot[0] + c["num_drafted"], slot[1] + c["num_accepted"]
    return {"seconds": seconds, "grammar_seconds": clock.seconds, "tokens": sum(len(o.token_ids) for o in outs),
            "steps": sum(o.stats["num_target_steps"] for o in outs), "valid": valid, "outputs": len(outs),
            "by_proposer": by, "token_ids": [o.token_ids for o in outs], "texts": [o.text for o in outs]}


def merge(runs: list[dict]) -> dict:
    total = {key: sum(r[key] for r in runs) for key in ("seconds", "grammar_seconds", "tokens", "steps", "valid",
                                                         "outputs")}
    by: dict[str, list[int]] = {}
    for r in runs:
        for name, (d, a) in r["by_proposer"].items():
            slot = by.setdefault(name, [0, 0])
            slot[0], slot[1] = slot[0] + d, slot[1] + a
    return {**total, "tokens_per_s": total["tokens"] / total["seconds"],
            "grammar_share": total["grammar_seconds"] / total["seconds"],
            "by_proposer": {n: {"num_drafted": d, "num_accepted": a} for n, (d, a) in by.items()},
            "sample": runs[0]["texts"][0]}


def workloads(tasks: dict[str, list], batches: list[int]) -> dict[str, list[list]]:
    """Each row's batches: at batch 1 every task of a kind alone, one after another; wider, the kinds mixed."""
    rows = {}
    for b in batches:
        if b == 1:
            rows.update({f"1 {kind}": [[t] for t in kind_tasks] for kind, kind_tasks in tasks.items()})
        else:
            mixed = [t for pair in zip(*tasks.values()) for t in pair]
            rows[f"{b} mixed"] = [[mixed[i % len(mixed)] for i in range(b)]]
    return rows


def measure(engine: LLMEngine, rows: dict[str, list[list]], max_tokens: int, rounds: int) -> tuple[dict, bool]:
    names = list(METHODS)
    runs = {row: {name: [] for name in names} for row in rows}
    identical = True
    for batches in rows.values():  # compile every constraint before timing
        for _, schema in (t for batch in batches for t in batch):
            engine.grammars.compile(Constraint.json_schema(schema))
    for r in tqdm(range(rounds), desc="rounds"):
        for row, batches in rows.items():
            for batch in batches:
                order = names[r % len(names):] + names[: r % len(names)]
                for name in order:
                    runs[row][name].append(run(engine, batch, max_tokens, METHODS[name]))
                plain = runs[row]["K=0"][-1]["token_ids"]
                identical &= all(runs[row][n][-1]["token_ids"] == plain for n in names)  # greedy: spec == plain
    table = {row: {name: merge(rs) for name, rs in by.items()} for row, by in runs.items()}
    batch_one = [row for row in runs if row.startswith("1 ")]
    if batch_one:  # every batch-1 task together: the goal's figure
        table["1 all"] = {name: merge([r for row in batch_one for r in runs[row][name]]) for name in names}
    return table, identical


def report(table: dict, identical: bool, dtype: str) -> list[dict]:
    print("\ntokens/s (× K=0), target steps per token, grammar time ÷ engine time, valid outputs, accepted/drafted")
    checks = []
    for row, rows in table.items():
        base = rows["K=0"]
        print(f"batch {row}")
        for m, r in rows.items():
            ratio = r["tokens_per_s"] / base["tokens_per_s"]
            by = ", ".join(f"{p} {c['num_accepted']}/{c['num_drafted']}" for p, c in r["by_proposer"].items())
            print(f"  {m:>7} {r['tokens_per_s']:7.1f} ({ratio:4.2f}x)  steps/token {r['steps'] / r['tokens']:.2f}  "
                  f"grammar {100 * r['grammar_share']:4.1f}%  valid {r['valid']}/{r['outputs']}  {by}")
        best = max(rows[m]["tokens_per_s"] for m in METHODS if m != "K=0") / base["tokens_per_s"]
        if row.startswith("1 "):
            checks.append({"goal": f"JSON-schema speculation >= {SPEED_GOAL}x K=0 at batch 1, {row[2:]} tasks "
                                   "(best method)", "value": best, "target": SPEED_GOAL, "met": best >= SPEED_GOAL})
        if row == "1 all" or not row.startswith("1 "):
            checks.append({"goal": f"grammar <= {MASK_GOAL:.0%} of a decode step at batch {row.split()[0]} (K=0)",
                           "value": base["grammar_share"], "target": MASK_GOAL,
                           "met": base["grammar_share"] <= MASK_GOAL})
    measured = [r for row, rows in table.items() if row != "1 all" for r in rows.values()]
    valid, outputs = sum(r["valid"] for r in measured), sum(r["outputs"] for r in measured)
    checks.append({"goal": "every output valid", "value": valid / outputs, "target": 1.0, "met": valid == outputs})
    checks.append({"goal": f"greedy: every method's tokens == K=0's ({dtype}; exact in float32)",
                   "value": float(identical), "target": 1.0, "met": identical})
    print("\ngoals")
    for g in checks:
        print(f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['value']:.3f} (target {g['target']})")
    return checks


def plot(table: dict, path: Path) -> None:
    fig, ax = subplots(figsize=(8, 4.5))
    names = list(METHODS)
    width = 0.8 / len(table)
    for i, (row, rows) in enumerate(table.items()):
        ratios = [rows[m]["tokens_per_s"] / rows["K=0"]["tokens_per_s"] for m in names]
        ax.bar([j + i * width for j in range(len(names))], ratios, width, label=f"batch {row}")
    ax.axhline(SPEED_GOAL, color="r", lw=0.8, ls="--", label=f"{SPEED_GOAL}x (goal, batch 1)")
    top = max(rows[m]["tokens_per_s"] / rows["K=0"]["tokens_per_s"] for rows in table.values() for m in names)
    ax.set_ylim(0, 1.1 * max(top, SPEED_GOAL))
    ax.set_xticks([j + width * (len(table) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("JSON-schema tokens/s ÷ K=0")
    ax.set_title("Structured outputs with speculation")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_args(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="batch 1 and 2, 40 tokens, one round")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.max_tokens, args.rounds = [1, 2], 40, 1
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(target_model=args.target, draft_model=args.draft, device=args.device,
                                    dtype=args.dtype, quantization=args.quantization))
    tasks = {kind: [(chat_prompt_ids(engine.tokenizer, q), schema) for q, schema in kind_tasks]
             for kind, kind_tasks in KINDS.items()}
    if args.quick:
        tasks = {kind: kind_tasks[:1] for kind, kind_tasks in tasks.items()}
    engine.generate([tasks["generative"][0][0]], SamplingParams(max_tokens=4))  # warm-up
    table, identical = measure(engine, workloads(tasks, args.batches), args.max_tokens, args.rounds)
    checks = report(table, identical, str(engine.pair.target.dtype))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "cpu": cpu_name(), "threads": args.threads, "dtype": str(engine.pair.target.dtype)}
    (out / "bench_structured.json").write_text(json.dumps({**meta, "results": table, "goals": checks}, indent=2))
    plot(table, out / "bench_structured.png")
    print(f"CPU: {meta['cpu']}, {args.threads} threads, {meta['dtype']}; "
          f"wrote {out / 'bench_structured.json'} and {out / 'bench_structured.png'}")


if __name__ == "__main__":
    main()
