"""Speculation on chat: the EAGLE head against the draft model and K=0, batch 1, greedy, side by side in one process.

Prompts the head and the draft never trained on: the chat questions of bench_common and the held-out share of
`helix distill`'s prompt set (open-ended), and the copy-heavy prompts of bench_planner. Each quantization gets
one target shared by two engines (one with the draft model, one with the head); methods run prompt by prompt,
interleaved, so machine noise hits all of them alike. Rows: tokens/s, × K=0, tokens per target step, what each
proposer drafted and had accepted, and whether every method's tokens equal K=0's.

    python scripts/bench_eagle.py                     # default pair + shipped head, none and int4, ~10 min
    python scripts/bench_eagle.py --quick             # smoke
    python scripts/bench_eagle.py --quantizations int4 --eagle-head NEW --baseline-head OLD   # two heads
    python scripts/bench_eagle.py --quantizations int4 --fixed-k 1 2 3 4 5    # the head at each fixed K too
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import CHAT_QUESTIONS, cpu_name, save_figure, subplots
from bench_planner import GROUNDED
from tqdm import tqdm

from helix_serve.config import DEFAULT_DRAFT, DEFAULT_TARGET, PRETRAINED_DIR, EngineConfig
from helix_serve.distill.data import chat_prompt_ids
from helix_serve.distill.prompts import build_prompts, split_prompts
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams

VERIFY_TOKENS = (1, 2, 3, 4, 5)  # a verify pass of K = 0 … 4 drafts
# method → (engine, SamplingParams overrides)
METHODS = {"K=0": ("draft", {"speculative": False}),
           "draft (hybrid)": ("draft", {"speculative_method": "hybrid"}),
           "eagle": ("eagle", {"speculative_method": "eagle"}),
           "eagle (hybrid)": ("eagle", {"speculative_method": "hybrid"})}


def methods(args) -> dict[str, tuple[str, dict]]:
    """METHODS, plus the head at each `--fixed-k`, and the head and hybrid of a second head (`--baseline-head`)."""
    fixed = {f"eagle K={k}": ("eagle", {"speculative_method": "eagle", "num_speculative_tokens": k})
             for k in args.fixed_k}
    if args.baseline_head is None:
        return {**METHODS, **fixed}
    return {**METHODS, **fixed, "eagle [baseline]": ("baseline", {"speculative_method": "eagle"}),
            "eagle (hybrid) [baseline]": ("baseline", {"speculative_method": "hybrid"})}


def engines(args, quantization: str) -> dict[str, LLMEngine]:
    common = dict(target_model=args.target, device="cpu", dtype=args.dtype, quantization=quantization)
    with_draft = LLMEngine(EngineConfig(draft_model=args.draft, **common))
    heads = {"eagle": args.eagle_head, **({"baseline": args.baseline_head} if args.baseline_head else {})}
    return {"draft": with_draft, **{name: LLMEngine(EngineConfig(draft_model=None, eagle_head=head, **common),
                                                    with_draft.pair) for name, head in heads.items()}}


def run(engine: LLMEngine, prompt: list[int], max_tokens: int, overrides: dict) -> dict:
    start = time.perf_counter()
    [out] = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, **overrides))
    return {"seconds": time.perf_counter() - start, "token_ids": out.token_ids,
            "steps": out.stats["num_target_steps"], "by_proposer": out.stats["by_proposer"]}


def total(runs: list[dict], reference: list[dict]) -> dict:
    tokens, seconds = sum(len(r["token_ids"]) for r in runs), sum(r["seconds"] for r in runs)
    by: dict[str, list[int]] = {}
    for r in runs:
        for name, c in r["by_proposer"].items():
            slot = by.setdefault(name, [0, 0])
            slot[0], slot[1] = slot[0] + c["num_drafted"], slot[1] + c["num_accepted"]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_step": tokens / sum(r["steps"] for r in runs),
            "by_proposer": {name: {"num_drafted": d, "num_accepted": a} for name, (d, a) in by.items()},
            "same_tokens_as_k0": all(r["token_ids"] == ref["token_ids"] for r, ref in zip(runs, reference))}


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    _, held_out = split_prompts(build_prompts(0))
    chosen = methods(args)
    results = {}
    for quantization in args.quantizations:
        pair = engines(args, quantization)
        tok = pair["draft"].tokenizer
        sets = {"chat": [chat_prompt_ids(tok, q) for q in CHAT_QUESTIONS[: args.chat] + held_out[: args.chat]],
                "copy-heavy": [chat_prompt_ids(tok, q) for q in GROUNDED[: args.copy]]}
        for engine_name, overrides in chosen.values():  # warm-up
            run(pair[engine_name], sets["chat"][0], 8, overrides)
        runs = {kind: {m: [] for m in chosen} for kind in sets}
        for kind, prompts in sets.items():
            for prompt in tqdm(prompts, desc=f"{quantization}, {kind}"):
                for method, (engine_name, overrides) in chosen.items():
                    runs[kind][method].append(run(pair[engine_name], prompt, args.max_tokens, overrides))
        target = pair["draft"].pair.target
        curve = pair["eagle"].step_costs.target  # the engine's start-up calibration: one sequence, T tokens
        results[quantization] = {
            "dtype": str(target.dtype), "quantization": target.quantization,
            "cost_ratios": {name: engine.cost_ratios for name, engine in pair.items()},
            "target_forward_ms": {t: 1e3 * float(curve.unscaled(t)) for t in VERIFY_TOKENS},
            "rows": {kind: {m: total(r, by[next(iter(METHODS))]) for m, r in by.items()} for kind, by in runs.items()},
        }
        del pair
    return {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "args": vars(args),
            "results": results}


def report(result: dict, out: Path) -> None:
    print(f"\n{result['cpu']}, {result['threads']} threads; batch 1, greedy, {result['args']['max_tokens']} tokens max")
    for quantization, q in result["results"].items():
        for kind, rows in q["rows"].items():
            base = rows["K=0"]["tokens_per_s"]
            forward = list(q["target_forward_ms"].values())  # at VERIFY_TOKENS (str keys once read back from JSON)
            curve = ", ".join(f"{t} tokens {ms:.2f} ms (×{ms / forward[0]:.2f})"
                              for t, ms in zip(VERIFY_TOKENS, forward))
            print(f"\n{quantization} ({q['dtype']}, {q['quantization']}), {kind}; target forward at {curve}")
            print(f"{'method':16} {'tok/s':>7} {'vs K=0':>7} {'tok/step':>8} {'ms/step':>7} {'= K=0':>6}  "
                  "accepted/drafted")
            for name, r in rows.items():
                by = ", ".join(f"{p} {c['num_accepted']}/{c['num_drafted']}" for p, c in r["by_proposer"].items())
                ms_per_step = 1e3 * r["tokens_per_step"] / r["tokens_per_s"]  # the whole request's time per step
                print(f"{name:16} {r['tokens_per_s']:7.1f} {r['tokens_per_s'] / base:7.2f} {r['tokens_per_step']:8.2f} "
                      f"{ms_per_step:7.2f} {str(r['same_tokens_as_k0']):>6}  {by}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_eagle.json").write_text(json.dumps(result, indent=2))
    panels = [(qn, kind) for qn, q in result["results"].items() for kind in q["rows"]]
    fig, axes = subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (quantization, kind) in zip(axes[0], panels):
        rows = result["results"][quantization]["rows"][kind]
        base = rows["K=0"]["tokens_per_s"]
        ax.bar(np.arange(len(rows)), [r["tokens_per_s"] / base for r in rows.values()])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(rows)), list(rows), rotation=30, fontsize=8)
        ax.set_title(f"{quantization} ({result['results'][quantization]['dtype'].removeprefix('torch.')}), {kind}",
                     fontsize=9)
        ax.set_ylabel("tokens/s ÷ K=0")
    fig.suptitle(f"EAGLE head vs draft model, batch 1 — {result['cpu']}, {result['threads']} threads", fontsize=9)
    save_figure(fig, out / "bench_eagle.png")
    print(f"wrote {out / 'bench_eagle.json'} and {out / 'bench_eagle.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--eagle-head", default=str(PRETRAINED_DIR / "smollm2-eagle"))
    parser.add_argument("--baseline-head", help="a second EAGLE head, measured beside --eagle-head")
    parser.add_argument("--fixed-k", type=int, nargs="*", default=[],
                        help="also the head alone at each of these fixed K (beside the planner's choice)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantizations", nargs="+", default=["none", "int4"])
    parser.add_argument("--chat", type=int, default=4, help="chat questions, and as many held-out distill prompts")
    parser.add_argument("--copy", type=int, default=4, help="copy-heavy prompts")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="1+1 chat and 1 copy prompt, 16 tokens, int4 only")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.chat, args.copy, args.max_tokens, args.quantizations = 1, 1, 16, ["int4"]
    report(measure(args), Path(args.out))


if __name__ == "__main__":
    main()
