"""Speculation under load: every method (draft model, prompt lookup, EAGLE head, hybrids) ÷ K=0 at 1, 4, 16 and 32
concurrent streams, fp32 and int4, side by side,
with how well the step-cost model predicted each step.

Streams are clients that send chat and copy-heavy prompts (mixed), each its next request as soon as its last
one finished, greedy, `ignore_eos`, requests of random lengths (`--length-spread`: with every request 48 tokens
long, plain decoding kept its streams in lockstep — they all ended on one step, so the next 16 prompts were
prefilled in one wave — while a method that drafted desynchronised them and prefilled in slices beside decode
rows: traced at 16 streams, int4, the head's engine spent 1.81 s in 26 prefill-bearing steps against K=0's 1.50 s
in 13, 3 % of the run, which no server with requests of different lengths sees), until they decoded `--rounds` ×
`--requests` requests' worth of tokens each;
what is still running is then aborted: the rate is steady-state throughput at that many concurrent requests, which
is what a server under that load delivers. Every method has its own engine (the same weights, the start-up
calibration copied), and they run interleaved: each for SLICE_S, then the next, in an order that rotates every
turn, each engine idle while the others run. These 2-vCPU VMs change speed by 10–25 % from minute to minute: with
whole runs one after another, two runs of the same configuration read 0.87–1.13× of each other (2026-12-03, Zen 5),
which no goal of a few percent survives; interleaved, drift hits every method alike. `--arrival wave` instead
sends all requests at once and runs them to the end (one run per method and round, one after another): there the
batch ends with its slowest sequence, so a token that speculation gains for a sequence that is not the last to
finish saves only its row's share of later steps (the tail runs fewer rows), not a whole token's — a wave
undervalues speculation under load. Each ratio comes with a 90 % interval from the interleaved turns (each
method's slice paired with K=0's of the same turn, turns resampled): a miss whose interval reaches the goal is one
this run cannot tell from noise. The prediction error is the engine's own (`LLMEngine.step_cost_log`: the
model's cost for each step's measured shape, taken before it learns from the step).

    python scripts/bench_load.py --dtype float32 --threads 2     # real pair, ~60 min on 2 cores
    python scripts/bench_load.py --quick                         # smoke
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
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
SLICE_S = 1.0  # each method's turn in the interleaved streams (module docstring)


def run(engine: LLMEngine, prompts: list[list[int]], streams: int, requests: int, max_tokens: int,
        overrides: dict) -> dict:
    """`streams` requests at once, run to the end (`--arrival wave`)."""
    clients = Clients(engine, SamplingParams(ignore_eos=True, **overrides),
                      zip(itertools.cycle(prompts), itertools.repeat(max_tokens)), 0, refill=False)
    clients.start(streams)
    clients.run_for(float("inf"))
    return clients.result()


@dataclass
class Clients:
    """One method's streams on its own engine: each client sends its next request as soon as its last one finished
    (`refill`), until they decoded `budget` tokens. `run_for` advances them; between calls the engine is idle."""

    engine: LLMEngine
    params: SamplingParams
    queue: Iterator[tuple[list[int], int]]  # each request's prompt and max_tokens
    budget: int
    refill: bool = True
    live: set[str] = field(default_factory=set)
    tokens: int = 0
    seconds: float = 0.0
    by: dict[str, list[int]] = field(default_factory=dict)
    slices: list[tuple[int, float]] = field(default_factory=list)  # each `run_for`'s tokens and seconds

    def start(self, streams: int) -> None:
        self.engine.step_cost_log.clear()
        self.live = {self.send() for _ in range(streams)}

    def send(self) -> str:
        prompt, max_tokens = next(self.queue)
        return self.engine.add_request(prompt, replace(self.params, max_tokens=max_tokens))

    @property
    def done(self) -> bool:
        return not self.live or (self.refill and self.tokens >= self.budget)

    def run_for(self, seconds: float) -> None:
        start, tokens = time.perf_counter(), self.tokens
        while not self.done and time.perf_counter() - start < seconds:
            for out in self.engine.step():
                self.tokens += len(out.new_token_ids)
                if out.proposer is not None:
                    slot = self.by.setdefault(out.proposer, [0, 0])
                    slot[0], slot[1] = slot[0] + out.num_drafted, slot[1] + out.num_accepted
                if out.finished:
                    self.live.remove(out.request_id)
                    if self.refill:
                        self.live.add(self.send())
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.slices.append((self.tokens - tokens, elapsed))

    def result(self) -> dict:
        for request_id in self.live:
            self.engine.abort_request(request_id)
        return {"seconds": self.seconds, "tokens": self.tokens, "by_proposer": self.by, "slices": self.slices,
                "errors": [predicted / measured - 1 for predicted, measured in self.engine.step_cost_log]}


def request_stream(prompts: list[list[int]], max_tokens: int, spread: float) -> Iterator[tuple[list[int], int]]:
    """Prompts in turn, each with a max_tokens drawn uniformly from (1 ± spread) × max_tokens (seeded: the same
    sequence for every method). Five fixed lengths, all multiples of 12, still ended plain decoding's streams on
    the same step: traced at 4 streams (fp32, Zen 5), K=0 prefilled its ~36 requests in 23 steps and the head's
    engine, whose drafts moved its streams' ends apart, in 33; two 10-token prompt tails beside two decode rows took
    60.1 ms in one pass, each beside three decode rows 46.6 ms (a decode pass: 21.4)."""
    rng = np.random.default_rng(0)
    low, high = max(1, round(max_tokens * (1 - spread))), max(1, round(max_tokens * (1 + spread)))
    for i in itertools.count():
        yield prompts[i % len(prompts)], int(rng.integers(low, high + 1))


def interleaved(engines: dict[str, LLMEngine], prompts: list[list[int]], streams: int, requests: int,
                max_tokens: int, rounds: int, spread: float) -> dict[str, dict]:
    """Every method's streams on its own engine, each running SLICE_S at a time in turn (module docstring)."""
    budget = streams * requests * max_tokens * rounds
    clients = {name: Clients(engines[name], SamplingParams(ignore_eos=True, **METHODS[name][1]),
                             request_stream(prompts, max_tokens, spread), budget) for name in engines}
    for c in clients.values():
        c.start(streams)
    names, turn = list(clients), 0
    while not all(c.done for c in clients.values()):
        for name in names[turn % len(names):] + names[: turn % len(names)]:
            clients[name].run_for(SLICE_S)
        turn += 1
    return {name: c.result() for name, c in clients.items()}


def ratio_interval(runs: list[dict], base: list[dict], draws: int = 2000) -> list[float] | None:
    """A 90 % interval of throughput ÷ K=0 over the interleaved turns: turns resampled with replacement, each
    method's slice paired with K=0's of the same turn (drift within a turn hits both), ratio of the sums."""
    pairs = [(m, b) for run, ref in zip(runs, base) for m, b in zip(run.get("slices", []), ref.get("slices", []))]
    if len(pairs) < 5:  # a run too short to resample
        return None
    tokens, seconds = np.array([[m[0], b[0]] for m, b in pairs], float), np.array([[m[1], b[1]] for m, b in pairs])
    picks = np.random.default_rng(0).integers(0, len(pairs), (draws, len(pairs)))
    rates = tokens[picks].sum(1) / seconds[picks].sum(1)  # [draws, 2]
    return [float(q) for q in np.percentile(rates[:, 0] / rates[:, 1], [5, 95])]


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
            rounds: int, requests: int, wave: bool, spread: float) -> dict[int, dict[str, dict]]:
    """Streams: every method interleaved (`interleaved`), `rounds` × `requests` requests' worth per stream. A wave:
    the methods one after another in an order that rotates every round."""
    names = list(engines)
    for engine in engines.values():
        run(engine, prompts[:2], 2, 1, 8, {})  # warm-up
    runs = {n: {name: [] for name in names} for n in streams}
    if not wave:
        for n in tqdm(streams, desc="loads"):
            for name, result in interleaved(engines, prompts, n, requests, max_tokens, rounds, spread).items():
                runs[n][name].append(result)
    else:
        for r in tqdm(range(rounds), desc="rounds"):
            for n in streams:
                turn = prompts[r % len(prompts):] + prompts[: r % len(prompts)]
                for name in names[r % len(names):] + names[: r % len(names)]:
                    runs[n][name].append(run(engines[name], turn, n, requests, max_tokens, METHODS[name][1]))
    table = {n: {name: merge(rs) for name, rs in by.items()} for n, by in runs.items()}
    for n, by in runs.items():
        for name, rs in by.items():
            table[n][name]["ratio_interval"] = ratio_interval(rs, by["K=0"])
    for rows in table.values():  # each round's method ÷ that round's K=0: a noisy round moves one sample
        base = rows["K=0"]["round_tokens_per_s"]
        for row in rows.values():
            row["ratio_median"] = float(np.median(np.divide(row["round_tokens_per_s"], base)))
    return table


def report(results: dict[str, dict[int, dict[str, dict]]]) -> list[dict]:
    checks = []
    for quant, table in results.items():
        print(f"\n{quant}: tokens/s (÷ K=0: streams over the whole run, waves the median of rounds), step-cost "
              "|error| median / p90")
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
                                   "target": GOAL, "met": ratio >= GOAL, "interval": r.get("ratio_interval")})
            print(f"{n:7d} " + " ".join(cells))
            intervals = [rows[m].get("ratio_interval") for m in methods]
            if any(intervals):
                print(f"{'90% CI':>7} " + " ".join(f"{'' if i is None else f'{i[0]:.2f}-{i[1]:.2f}':>24}"
                                                   for i in intervals))
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
    for g in checks:  # a miss whose interval reaches the goal is not told apart from noise by this run
        interval = g.get("interval")
        noise = "" if g["met"] or interval is None or interval[1] < g["target"] else ", within noise"
        span = "" if interval is None else f", 90% CI {interval[0]:.3f}-{interval[1]:.3f}"
        verdict = "met" if g["met"] else "MISSED"
        print(f"  [{verdict}] {g['goal']}: {g['value']:.3f} (target {g['target']}{span}{noise})")
    return checks


def plot(results: dict[str, dict[int, dict[str, dict]]], path: Path, arrival: str) -> None:
    fig, axes = subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (quant, table) in zip(axes[0], results.items()):
        streams = list(table)
        for m in list(next(iter(table.values())))[1:]:
            ratios = [table[n][m]["ratio_median"] for n in streams]
            spans = [table[n][m].get("ratio_interval") or [r, r] for n, r in zip(streams, ratios)]
            ax.errorbar(streams, ratios, yerr=np.abs(np.transpose(spans) - ratios), marker="o", capsize=3, label=m)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(GOAL, color="r", lw=0.8, ls="--", label=f"{GOAL} (goal)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(streams, [str(n) for n in streams])
        ax.set_xlabel(f"{arrival} (chat + copy-heavy prompts)")
        ax.set_ylabel("throughput ÷ K=0")
        ax.set_title(f"quantization {quant}")
        ax.legend()
    save_figure(fig, path)


def method_engine(base: LLMEngine) -> LLMEngine:
    """An engine of its own for one method: `base`'s weights and configuration, its measured step costs copied
    (calibrating again would take a minute per method)."""
    config = replace(base.config, draft_cost_ratio=0.3, verify_cost_ratio=0.0)  # given ratios: no calibration
    engine = LLMEngine(config, base.pair)
    engine.step_costs = copy.deepcopy(base.step_costs)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_args(parser, quantization=False)
    parser.add_argument("--eagle-head", default="smollm2-eagle", help="'' to leave the head's methods out")
    parser.add_argument("--quantizations", nargs="+", default=["none", "int4"])
    parser.add_argument("--int4-dense-rows", type=dense_rows_arg, default=0, help="int4: 'auto' or a row count")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=48, help="streams: the mean (--length-spread)")
    parser.add_argument("--length-spread", type=float, default=0.5,
                        help="streams: requests' max_tokens vary by ± this fraction (module docstring); 0: all alike")
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
        config = EngineConfig(target_model=args.target, draft_model=args.draft, device=args.device, dtype=args.dtype,
                              quantization=quant, int4_dense_rows=dense_rows)
        engine = LLMEngine(config)
        kinds = {"draft": engine}
        if args.eagle_head:  # the same target weights, with the head as the model-based proposer
            kinds["eagle"] = LLMEngine(replace(config, draft_model=None, eagle_head=args.eagle_head), engine.pair)
        engines = {name: method_engine(kinds[kind]) for name, (kind, _) in METHODS.items() if kind in kinds}
        tokenizer = engine.tokenizer
        encode = (lambda p: chat_prompt_ids(tokenizer, p)) if tokenizer.chat_template else (
            lambda p: tokenizer(p).input_ids)
        prompts = [encode(p) for pair in zip(CHAT, GROUNDED) for p in pair]  # chat and copy-heavy, alternating
        results[quant] = measure(engines, prompts, args.streams, args.max_tokens, args.rounds, args.requests,
                                 args.arrival == "wave", args.length_spread)
        dtypes[quant] = str(engine.pair.target.dtype)
        dense[quant] = engine.pair.target.int4_dense_rows
        del engine, kinds, engines
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
