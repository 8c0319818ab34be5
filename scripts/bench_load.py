"""Speculation under load: every method (draft model, prompt lookup, EAGLE head, hybrids) ÷ K=0 at 1, 4, 16 and 32
concurrent streams, fp32 and int4, side by side,
with how well the step-cost model predicted each step.

Streams are clients that send chat and copy-heavy prompts (mixed), each its next request as soon as its last
one finished, greedy, `ignore_eos`. A run stops once the streams have decoded `--requests` requests' worth of
tokens each and aborts what is still running: the rate is steady-state throughput at that many concurrent
requests, which is what a server under that load delivers. `--arrival wave` instead sends all requests at once
and runs them to the end (one `engine.generate` call): there the batch ends with its slowest sequence, so a token
that speculation gains for a sequence that is not the last to finish saves only its row's share of later steps
(the tail runs fewer rows), not a whole token's — a wave undervalues speculation under load. Methods run one
after another at each load, in an order that rotates every round, so machine noise hits all of them alike. The
prediction error is the engine's own (`LLMEngine.step_cost_log`: the model's cost for each step's measured shape,
taken before it learns from the step).

    python scripts/bench_load.py --dtype float32 --threads 2     # real pair, ~60 min on 2 cores
    python scripts/bench_load.py --quick                         # smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import add_pair_args, cpu_name, save_figure, subplots
from bench_planner import CHAT, GROUNDED
from tqdm import tqdm

from helix_serve.cli import dense_rows_arg
from helix_serve.config import EngineConfig
from helix_serve.distill.data import chat_prompt_ids
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams

# method → (engine, request overrides): one engine loads the draft model, the other the EAGLE head on the same
# target (an engine holds one model-based proposer). Every ratio is to K=0 on the first, which never runs its
# draft: plain decoding. "K=0 (head)" is the head's engine with speculation off, which should read 1.00x (until the
# sixth session its prefix cache reused no prompt cached without the head's K/V: block_manager.py, cached_prefix).
METHODS = {"K=0": ("draft", {"speculative": False}), "draft": ("draft", {"speculative_method": "draft"}),
           "ngram": ("draft", {"speculative_method": "ngram"}), "hybrid": ("draft", {"speculative_method": "hybrid"}),
           "K=0 (head)": ("eagle", {"speculative": False}), "eagle": ("eagle", {"speculative_method": "eagle"}),
           "hybrid+eagle": ("eagle", {"speculative_method": "hybrid"})}
GOAL = 0.97


def run(engine: LLMEngine, prompts: list[list[int]], streams: int, requests: int, max_tokens: int,
        overrides: dict, wave: bool = False) -> dict:
    """`streams` clients sending `prompts` in turn, each a new request when its last one finished, until they
    decoded `requests` requests' worth of tokens each (module docstring); with `wave`, `streams` requests at
    once, run to the end."""
    engine.step_cost_log.clear()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **overrides)
    queue = (prompts[i % len(prompts)] for i in itertools.count())
    start = time.perf_counter()
    live = {engine.add_request(next(queue), params) for _ in range(streams)}
    budget, tokens = streams * requests * max_tokens, 0
    by: dict[str, list[int]] = {}
    while live and (wave or tokens < budget):
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.proposer is not None:
                slot = by.setdefault(out.proposer, [0, 0])
                slot[0], slot[1] = slot[0] + out.num_drafted, slot[1] + out.num_accepted
            if out.finished:
                live.remove(out.request_id)
                if not wave:
                    live.add(engine.add_request(next(queue), params))
    seconds = time.perf_counter() - start
    for request_id in live:
        engine.abort_request(request_id)
    return {"seconds": seconds, "tokens": tokens,
            "errors": [predicted / measured - 1 for predicted, measured in engine.step_cost_log], "by_proposer": by}


def merge(runs: list[dict]) -> dict:
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    errors = np.abs([e for r in runs for e in r["errors"]])
    by: dict[str, list[int]] = {}
    for r in runs:
        for name, (d, a) in r["by_proposer"].items():
            slot = by.setdefault(name, [0, 0])
            slot[0], slot[1] = slot[0] + d, slot[1] + a
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "steps": len(errors),
            "round_tokens_per_s": [r["tokens"] / r["seconds"] for r in runs],
            "cost_error_median": float(np.median(errors)) if len(errors) else None,
            "cost_error_p90": float(np.percentile(errors, 90)) if len(errors) else None,
            "by_proposer": {n: {"num_drafted": d, "num_accepted": a} for n, (d, a) in by.items()}}


def measure(engines: dict[str, LLMEngine], prompts: list[list[int]], streams: list[int], max_tokens: int,
            rounds: int, requests: int, wave: bool) -> dict[int, dict[str, dict]]:
    names = [m for m, (engine, _) in METHODS.items() if engine in engines]
    runs = {n: {name: [] for name in names} for n in streams}
    for engine in engines.values():
        run(engine, prompts[:2], 2, 1, 8, {})  # warm-up
    for r in tqdm(range(rounds), desc="rounds"):
        for n in streams:
            turn = prompts[r % len(prompts):] + prompts[: r % len(prompts)]
            for name in names[r % len(names):] + names[: r % len(names)]:
                engine, overrides = METHODS[name]
                runs[n][name].append(run(engines[engine], turn, n, requests, max_tokens, overrides, wave))
    table = {n: {name: merge(rs) for name, rs in by.items()} for n, by in runs.items()}
    for rows in table.values():  # each round's method ÷ that round's K=0: a noisy round moves one sample
        base = rows["K=0"]["round_tokens_per_s"]
        for row in rows.values():
            row["ratio_median"] = float(np.median(np.divide(row["round_tokens_per_s"], base)))
    return table


def report(results: dict[str, dict[int, dict[str, dict]]]) -> list[dict]:
    checks = []
    for quant, table in results.items():
        print(f"\n{quant}: tokens/s (median over rounds of the round's ÷ K=0), step-cost |error| median / p90")
        methods = list(next(iter(table.values())))
        print(f"{'streams':>7} " + " ".join(f"{m:>24}" for m in methods))
        for n, rows in table.items():
            cells = []
            for m in methods:
                r = rows[m]
                ratio = r["ratio_median"]
                err = "" if r["cost_error_median"] is None else f"{r['cost_error_median']:.2f}/{r['cost_error_p90']:.2f}"
                cells.append(f"{r['tokens_per_s']:6.1f} ({ratio:4.2f}x) {err:>9}")
                if METHODS[m][1].get("speculative", True):
                    checks.append({"goal": f"{m} >= {GOAL}x K=0 at {n} streams ({quant})", "value": ratio,
                                   "target": GOAL, "met": ratio >= GOAL})
            print(f"{n:7d} " + " ".join(cells))
        for n, rows in table.items():
            by = {m: r["by_proposer"] for m, r in rows.items() if r["by_proposer"]}
            print(f"  {n} streams accepted/drafted: " + "; ".join(
                f"{m}: " + ", ".join(f"{p} {c['num_accepted']}/{c['num_drafted']}" for p, c in b.items())
                for m, b in by.items()))
    errors = [r["cost_error_median"] for t in results.values() for rows in t.values() for r in rows.values()
              if r["cost_error_median"] is not None]
    checks.append({"goal": "step-cost prediction within 10 % (worst median |error| of any row)",
                   "value": max(errors), "target": 0.10, "met": max(errors) <= 0.10})
    print("\ngoals")
    for g in checks:
        print(f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['value']:.3f} (target {g['target']})")
    return checks


def plot(results: dict[str, dict[int, dict[str, dict]]], path: Path, arrival: str) -> None:
    fig, axes = subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (quant, table) in zip(axes[0], results.items()):
        streams = list(table)
        for m in list(next(iter(table.values())))[1:]:
            ax.plot(streams, [table[n][m]["ratio_median"] for n in streams],
                    marker="o", label=m)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(GOAL, color="r", lw=0.8, ls="--", label=f"{GOAL} (goal)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(streams, [str(n) for n in streams])
        ax.set_xlabel(f"{arrival} (chat + copy-heavy prompts)")
        ax.set_ylabel("throughput ÷ K=0 (median over rounds)")
        ax.set_title(f"quantization {quant}")
        ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_args(parser, quantization=False)
    parser.add_argument("--eagle-head", default="smollm2-eagle", help="'' to leave the head's methods out")
    parser.add_argument("--quantizations", nargs="+", default=["none", "int4"])
    parser.add_argument("--int4-dense-rows", type=dense_rows_arg, default=0, help="int4: 'auto' or a row count")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3, help="requests' worth of tokens per stream and run")
    parser.add_argument("--arrival", choices=["streams", "wave"], default="streams", help="module docstring")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="streams 1 and 4, 12 tokens, one round")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.max_tokens, args.rounds, args.requests = [1, 4], 12, 1, 1
    torch.set_num_threads(args.threads)
    dense_rows = args.int4_dense_rows
    results, dtypes, dense = {}, {}, {}
    for quant in args.quantizations:
        engine = LLMEngine(EngineConfig(target_model=args.target, draft_model=args.draft, device=args.device,
                                        dtype=args.dtype, quantization=quant, int4_dense_rows=dense_rows))
        engines = {"draft": engine}
        if args.eagle_head:  # the same target weights, with the head as the model-based proposer
            engines["eagle"] = LLMEngine(EngineConfig(target_model=args.target, draft_model=None,
                                                      eagle_head=args.eagle_head, device=args.device,
                                                      dtype=args.dtype, quantization=quant,
                                                      int4_dense_rows=dense_rows), engine.pair)
        tokenizer = engine.tokenizer
        encode = (lambda p: chat_prompt_ids(tokenizer, p)) if tokenizer.chat_template else (
            lambda p: tokenizer(p).input_ids)
        prompts = [encode(p) for pair in zip(CHAT, GROUNDED) for p in pair]  # chat and copy-heavy, alternating
        results[quant] = measure(engines, prompts, args.streams, args.max_tokens, args.rounds, args.requests,
                                 args.arrival == "wave")
        dtypes[quant] = str(engine.pair.target.dtype)
        dense[quant] = engine.pair.target.int4_dense_rows
        del engine, engines
    checks = report(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "cpu": cpu_name(), "threads": args.threads, "dtypes": dtypes,
            "int4_dense_rows": dense}
    (out / "bench_load.json").write_text(json.dumps({**meta, "results": results, "goals": checks}, indent=2))
    plot(results, out / "bench_load.png", "requests in one wave" if args.arrival == "wave" else "streams")
    print(f"CPU: {meta['cpu']}, {args.threads} threads; wrote {out / 'bench_load.json'} and {out / 'bench_load.png'}")


if __name__ == "__main__":
    main()
