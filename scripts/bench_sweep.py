"""Acceptance and speed vs K (0..8) and vs temperature, with Leviathan's theoretical curve.

Each configuration runs the same prompts, interleaved configuration by configuration for every prompt,
in one process. Speedups are relative to K=0 (the target alone, same engine) at the same temperature.

    python scripts/bench_sweep.py          # embedded pair
    python scripts/bench_sweep.py --quick  # CI smoke
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_common import (add_pair_args, bandwidth_limit, bench_prompts, run_helix, save_figure, step_costs, subplots,
                          summarize)
from tqdm import tqdm

from helix_serve.config import EngineConfig
from helix_serve.engine.planner import expected_speedup
from helix_serve.engine.llm_engine import LLMEngine


def sweep(engine: LLMEngine, prompts: list[str], configs: list[tuple[int, float]], max_tokens: int,
          repeats: int, limit_step_s: float) -> dict[tuple[int, float], dict]:
    runs: dict[tuple[int, float], list[dict]] = {c: [] for c in configs}
    for rep in tqdm(range(repeats * len(prompts)), desc="prompts"):
        prompt = prompts[rep % len(prompts)]
        for k, temp in configs:
            params = {"num_speculative_tokens": k, "temperature": temp, "seed": rep} if k else {
                "speculative": False, "temperature": temp, "seed": rep}
            runs[(k, temp)].append(run_helix(engine, prompt, max_tokens, **params))
    return {c: summarize(r, limit_step_s) for c, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_args(parser)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--k-for-temperature", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="K in {0,2,4}, T in {0,0.8}, 2 prompts, 24 tokens")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    ks = [0, 2, 4] if args.quick else list(range(9))
    temps = [0.0, 0.8] if args.quick else [0.0, 0.5, 0.8, 1.0]
    engine = LLMEngine(EngineConfig(target_model=args.target, draft_model=args.draft, device=args.device,
                                    dtype=args.dtype, quantization=args.quantization, num_kv_blocks=256))
    prompts = bench_prompts(engine)
    prompts, max_tokens = (prompts[:2], 24) if args.quick else (prompts, args.max_tokens)
    run_helix(engine, prompts[0], 8, num_speculative_tokens=2)  # warm-up
    k_t = args.k_for_temperature
    configs = sorted({(k, 0.0) for k in ks} | {(0, t) for t in temps} | {(k_t, t) for t in temps})
    limit = bandwidth_limit(engine)
    rows = sweep(engine, prompts, configs, max_tokens, args.repeats, limit["limit_step_s"])
    costs = step_costs(engine)
    c, v = costs["cost_ratio"], costs["verify_ratio"]

    def speedup(k: int, t: float) -> float:
        return rows[(k, t)]["tokens_per_s"] / rows[(0, t)]["tokens_per_s"]

    print(f"\ncost ratios c = {c:.3f}, v = {v:.3f}; "
          f"{len(prompts) * args.repeats} prompts x {max_tokens} tokens per configuration")
    print(f"bandwidth limit: {limit['weight_bytes'] / 1e6:.0f} MB of target weights / "
          f"{limit['gemv_bytes_per_s'] / 1e9:.1f} GB/s = {limit['limit_step_s'] * 1e3:.1f} ms per target step; "
          "bw = that limit / measured ms per target step")
    print(f"{'K':>3} {'T':>4} {'tok/s':>8} {'alpha':>7} {'speedup':>8} {'theory':>7} {'theory+v':>9} {'bw':>5}")
    table = []
    for k, t in configs:
        row = rows[(k, t)]
        alpha = row.get("alpha", 0.0)
        theory, theory_v = expected_speedup(alpha, k, c), expected_speedup(alpha, k, c, v)
        table.append({"k": k, "temperature": t, **row, "speedup": speedup(k, t), "theory": theory,
                      "theory_with_verify_cost": theory_v})
        print(f"{k:3d} {t:4.1f} {row['tokens_per_s']:8.1f} {alpha:7.3f} {speedup(k, t):8.2f} {theory:7.2f} "
              f"{theory_v:9.2f} {row['bandwidth_limit_ratio']:5.2f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sweep.json").write_text(json.dumps({"args": vars(args), "costs": costs, "bandwidth_limit": limit,
                                                      "rows": table}, indent=2))
    plot(table, ks, temps, k_t, out / "bench_sweep.png")
    print(f"wrote {out / 'bench_sweep.json'} and {out / 'bench_sweep.png'}")


def plot(table: list[dict], ks: list[int], temps: list[float], k_t: int, path: Path) -> None:
    by = {(r["k"], r["temperature"]): r for r in table}
    fig, (left, right) = subplots(1, 2, figsize=(11, 4))
    left.plot(ks, [by[(k, 0.0)]["speedup"] for k in ks], "o-", label="measured")
    left.plot(ks, [by[(k, 0.0)]["theory"] for k in ks], "s--", label="Leviathan (measured α, c)")
    left.plot(ks, [by[(k, 0.0)]["theory_with_verify_cost"] for k in ks], "^:", label="with verify cost v")
    left.set(xlabel="K (draft tokens)", ylabel="speedup vs K=0", title="greedy, batch 1")
    left.legend()
    right.plot(temps, [by[(k_t, t)].get("alpha", 0) for t in temps], "o-", label="acceptance α")
    right.plot(temps, [by[(k_t, t)]["speedup"] for t in temps], "s-", label="speedup vs K=0")
    right.plot(temps, [by[(k_t, t)]["theory"] for t in temps], "^--", label="Leviathan")
    right.plot(temps, [by[(k_t, t)]["theory_with_verify_cost"] for t in temps], "v:", label="with verify cost v")
    right.set(xlabel="temperature", title=f"K={k_t}, batch 1")
    right.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
