"""Batch-1 decoding speed, side by side in one process: Helix speculative (fixed K and planned),
Helix K=0, each of those two with `logprobs=5` (the cost of reporting logprobs), Helix with `quantization:
int4` (K=0 and planned; where the CPU int4 kernel exists), transformers greedy `generate`, transformers
assisted generation (`assistant_model=`).

Methods are interleaved prompt by prompt so machine noise hits all of them alike. Prints a table,
writes JSON and a PNG, and compares the achieved speedup with Leviathan's theoretical
(1 − α^(K+1)) / ((1 − α)(K·c + 1)) for the measured acceptance α and cost ratio c.

    python scripts/bench_speculative.py            # embedded pair
    python scripts/bench_speculative.py --quick    # CI smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from bench_common import (add_pair_args, bandwidth_limit, bench_prompts, run_helix, save_figure, step_costs, subplots,
                          summarize)
from tqdm import tqdm

from helix_serve.config import EngineConfig
from helix_serve.engine.planner import expected_speedup
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.model.int4 import int4_available


def run_hf(engine: LLMEngine, prompt: str | list[int], max_tokens: int, assisted: bool) -> dict:
    target = engine.pair.target.hf_model
    token_ids = engine.tokenizer(prompt).input_ids if isinstance(prompt, str) else prompt
    ids = torch.tensor([token_ids], device=engine.device)
    extra = {"assistant_model": engine.pair.draft.hf_model} if assisted else {}
    start = time.perf_counter()
    with torch.inference_mode():
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, do_sample=False, pad_token_id=engine.tokenizer.eos_token_id,
                              **extra)
    return {"seconds": time.perf_counter() - start, "tokens": out.shape[1] - ids.shape[1], "ttft": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_args(parser)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="2 prompts, 24 tokens, 1 repeat (CI smoke)")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = EngineConfig(target_model=args.target, draft_model=args.draft, device=args.device, dtype=args.dtype,
                          quantization=args.quantization, num_kv_blocks=256)
    engine = LLMEngine(config)
    int4 = None if int4_available(engine.device) else LLMEngine(dataclasses.replace(config, quantization="int4"))
    prompts = bench_prompts(engine)
    prompts, max_tokens, repeats = (prompts[:2], 24, 1) if args.quick else (prompts, args.max_tokens, args.repeats)
    methods = {
        f"helix spec K={args.k}": lambda p: run_helix(engine, p, max_tokens, num_speculative_tokens=args.k),
        "helix spec adaptive K": lambda p: run_helix(engine, p, max_tokens),
        "helix adaptive+logprobs": lambda p: run_helix(engine, p, max_tokens, logprobs=5),
        "helix K=0 (plain)": lambda p: run_helix(engine, p, max_tokens, speculative=False),
        "helix K=0+logprobs": lambda p: run_helix(engine, p, max_tokens, speculative=False, logprobs=5),
        "HF greedy generate": lambda p: run_hf(engine, p, max_tokens, assisted=False),
    }
    if int4 is not None:
        methods["helix int4 K=0"] = lambda p: run_helix(int4, p, max_tokens, speculative=False)
        methods["helix int4 adaptive K"] = lambda p: run_helix(int4, p, max_tokens)
    # transformers' assisted generation needs a draft over the target's own token ids; a sub-vocabulary
    # draft (helix distill's) or one with fewer rows is only understood through Helix's vocabulary map.
    if not engine.decoder.draft.vocab_map.identity:
        print("HF assisted generate: skipped, the draft's vocabulary differs from the target's (model/vocab_map.py)")
    else:
        methods["HF assisted generate"] = lambda p: run_hf(engine, p, max_tokens, assisted=True)
    for fn in methods.values():  # warm-up: first calls pay one-off allocation and dispatch costs
        fn(prompts[0])
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    for _ in tqdm(range(repeats), desc="repeats"):
        for prompt in prompts:
            for name, fn in methods.items():
                runs[name].append(fn(prompt))
    limit = bandwidth_limit(engine)
    int4_limit = bandwidth_limit(int4) if int4 is not None else None  # its 4-bit projections read fewer bytes
    rows = {name: summarize(r, (int4_limit if "int4" in name else limit)["limit_step_s"]) for name, r in runs.items()}
    cost = {**step_costs(engine), **limit, "dtype": str(engine.pair.target.dtype)}
    if int4 is not None:
        cost["int4"] = {**step_costs(int4), **int4_limit}
    report(rows, cost, args, max_tokens, len(prompts) * repeats)


def fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def report(rows: dict, cost: dict, args, max_tokens: int, num_runs: int) -> None:
    base, hf = rows["helix K=0 (plain)"]["tokens_per_s"], rows["HF greedy generate"]["tokens_per_s"]
    assisted = rows["HF assisted generate"]["tokens_per_s"] if "HF assisted generate" in rows else None
    fixed = rows[f"helix spec K={args.k}"]
    alpha, c, v = fixed.get("alpha", 0.0), cost["cost_ratio"], cost["verify_ratio"]
    theory = expected_speedup(alpha, args.k, c)  # Leviathan: the verify pass costs one forward
    theory_v = expected_speedup(alpha, args.k, c, v)  # with the measured growth of the verify pass
    summary = {
        "alpha_fixed_k": alpha, "acceptance_rate_fixed_k": fixed.get("acceptance_rate"), "cost_ratio_c": c, "k": args.k,
        "theoretical_speedup": theory, "theoretical_speedup_with_verify_cost": theory_v, "verify_ratio_v": v,
        "achieved_speedup_vs_k0": fixed["tokens_per_s"] / base,
        "achieved_over_theory": fixed["tokens_per_s"] / base / theory,
        "spec_over_hf_assisted": fixed["tokens_per_s"] / assisted if assisted else None,
        "logprobs_cost_adaptive": rows["helix adaptive+logprobs"]["tokens_per_s"]
        / rows["helix spec adaptive K"]["tokens_per_s"],
        "logprobs_cost_k0": rows["helix K=0+logprobs"]["tokens_per_s"] / base,
    }
    if "int4" in cost:
        summary["int4_k0_vs_k0"] = rows["helix int4 K=0"]["tokens_per_s"] / base
        summary["int4_k0_vs_hf"] = rows["helix int4 K=0"]["tokens_per_s"] / hf
        summary["int4_adaptive_vs_int4_k0"] = (rows["helix int4 adaptive K"]["tokens_per_s"]
                                               / rows["helix int4 K=0"]["tokens_per_s"])
    print(f"\nbatch 1, {num_runs} runs x {max_tokens} tokens, dtype {cost['dtype']}, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"bandwidth limit: {cost['weight_bytes'] / 1e6:.0f} MB of target weights / "
          f"{cost['gemv_bytes_per_s'] / 1e9:.1f} GB/s measured GEMV = {cost['limit_step_s'] * 1e3:.1f} ms per forward")
    print(f"{'method':24} {'tok/s':>8} {'vs K=0':>7} {'vs HF':>7} {'alpha':>7} {'accept':>7} {'tok/step':>8} "
          f"{'step ms':>8} {'limit/step':>10} {'TTFT ms':>8}")
    for name, r in rows.items():
        print(f"{name:24} {r['tokens_per_s']:8.1f} {r['tokens_per_s'] / base:7.2f} {r['tokens_per_s'] / hf:7.2f} "
              f"{fmt(r.get('alpha'), '7.2f'):>7} {fmt(r.get('acceptance_rate'), '7.2f'):>7} "
              f"{fmt(r.get('mean_accepted_length'), '8.2f'):>8} {r['step_ms']:8.1f} "
              f"{r['bandwidth_limit_ratio']:10.2f} {fmt(r['ttft_ms_median'], '8.1f'):>8}")
    print(f"\ncost ratio c = {c:.3f} (draft {cost['draft_step_s'] * 1e3:.2f} ms / target "
          f"{cost['target_step_s'] * 1e3:.2f} ms per decode forward; target verify of 5 tokens "
          f"{cost['target_verify5_s'] * 1e3:.2f} ms)")
    print(f"theory at alpha={alpha:.3f}, K={args.k}, c={c:.3f}: {theory:.2f}x; "
          f"achieved {summary['achieved_speedup_vs_k0']:.2f}x = {summary['achieved_over_theory']:.2f} of theory; "
          f"spec / HF assisted = {fmt(summary['spec_over_hf_assisted'], '.2f')}x")
    print(f"with the measured verify growth v={v:.3f}/token the model predicts {theory_v:.2f}x "
          f"(achieved = {fixed['tokens_per_s'] / base / theory_v:.2f} of it)")
    print(f"logprobs=5 keeps {summary['logprobs_cost_adaptive']:.3f} of the tokens/s with speculation, "
          f"{summary['logprobs_cost_k0']:.3f} without")
    if "int4" in cost:
        q = cost["int4"]
        print(f"int4: {q['weight_bytes'] / 1e6:.0f} MB read per forward = {q['limit_step_s'] * 1e3:.1f} ms limit; "
              f"decode {q['target_step_s'] * 1e3:.2f} ms, verify of 5 tokens {q['target_verify5_s'] * 1e3:.2f} ms "
              f"({q['target_verify5_s'] / q['target_step_s']:.2f}x), c = {q['cost_ratio']:.3f}; "
              f"K=0 {summary['int4_k0_vs_k0']:.2f}x fp32 K=0, {summary['int4_k0_vs_hf']:.2f}x HF greedy; "
              f"planned K {summary['int4_adaptive_vs_int4_k0']:.2f}x int4 K=0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_speculative.json").write_text(json.dumps({"args": vars(args), "rows": rows, "cost": cost,
                                                            "summary": summary}, indent=2))
    plot(rows, summary, out / "bench_speculative.png")
    print(f"wrote {out / 'bench_speculative.json'} and {out / 'bench_speculative.png'}")


def plot(rows: dict, summary: dict, path: Path) -> None:
    fig, ax = subplots(figsize=(8, 4))
    names = list(rows)
    def color(name: str) -> str:  # one hue per family: speculative, K=0, int4, transformers
        family = "int4" if "int4" in name else "HF" if "HF" in name else "K=0" if "K=0" in name else "spec"
        return {"int4": "#6a4c93", "HF": "#e76f51", "K=0": "#999", "spec": "#2a9d8f"}[family]

    ax.barh(names, [rows[n]["tokens_per_s"] for n in names], color=[color(n) for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("tokens / s (batch 1)")
    ax.set_title(f"theory {summary['theoretical_speedup']:.2f}x at α={summary['alpha_fixed_k']:.2f}, "
                 f"c={summary['cost_ratio_c']:.2f}; achieved {summary['achieved_speedup_vs_k0']:.2f}x vs K=0")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
