"""The speculation planner on the real pair at batch 1: proposers × prompt kinds, side by side.

Batch 1: grounded prompts (repeat, extract, rewrite or edit a given passage or code) and open chat, each
decoded by Helix K=0, the draft model (planned K and fixed K), prompt lookup (planned and fixed K), hybrid,
transformers greedy and transformers prompt lookup (`prompt_lookup_num_tokens`); methods are interleaved
prompt by prompt so machine noise hits all of them alike. Prints the tables and the goals, writes JSON and a PNG.
Under load (concurrent streams) see bench_load.py.

    python scripts/bench_planner.py --threads 2            # real pair, ~15 min on 2 cores
    python scripts/bench_planner.py --quick                # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_common import CHAT_QUESTIONS, add_pair_args, save_figure, subplots
from tqdm import tqdm

from helix_serve.config import EngineConfig
from helix_serve.distill.data import chat_prompt_ids
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.ngram_proposer import NgramProposer
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.engine.sequence import Sequence

PASSAGE = ("The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual "
           "reefs and 900 islands stretching for over 2,300 kilometres. It is located in the Coral Sea, off the "
           "coast of Queensland, Australia. The reef was selected as a World Heritage Site in 1981. In 2016 and "
           "2017 it suffered severe coral bleaching caused by rising sea temperatures.")
CODE = ("def average(values):\n    total = 0\n    for value in values:\n        total += value\n"
        "    return total / len(value)\n")
GROUNDED = [
    f"Repeat the following text exactly, word for word:\n\n{PASSAGE}",
    f"Copy this Python function, fixing the bug in its last line. Reply with the whole function:\n\n{CODE}",
    f"List every number that appears in this passage, each with the words around it:\n\n{PASSAGE}",
    f"Rewrite this passage as a bulleted list of facts, keeping the original wording:\n\n{PASSAGE}",
    f"Add a docstring to this function and return the full code:\n\n{CODE}",
    f"Quote the sentences of this passage that mention a year:\n\n{PASSAGE}",
]
CHAT = CHAT_QUESTIONS[:6]


def methods(k_fixed: tuple[int, ...]) -> dict[str, dict]:
    """SamplingParams overrides per Helix method."""
    table = {"K=0": {"speculative": False}, "draft planned": {"speculative_method": "draft"}}
    table.update({f"draft K={k}": {"speculative_method": "draft", "num_speculative_tokens": k} for k in k_fixed})
    table["ngram planned"] = {"speculative_method": "ngram"}
    table.update({f"ngram K={k}": {"speculative_method": "ngram", "num_speculative_tokens": k} for k in k_fixed})
    table["hybrid planned"] = {"speculative_method": "hybrid"}
    return table


def run_helix(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, overrides: dict) -> dict:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **overrides)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    by = {}
    for o in outs:
        for name, counts in o.stats["by_proposer"].items():
            slot = by.setdefault(name, {"num_drafted": 0, "num_accepted": 0})
            slot["num_drafted"] += counts["num_drafted"]
            slot["num_accepted"] += counts["num_accepted"]
    return {"seconds": seconds, "tokens": sum(o.stats["tokens_generated"] for o in outs),
            "target_steps": sum(o.stats["num_target_steps"] for o in outs), "by_proposer": by}


def run_hf(engine: LLMEngine, prompt: list[int], max_tokens: int, lookup: int | None) -> dict:
    ids = torch.tensor([prompt], device=engine.device)
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    start = time.perf_counter()
    with torch.inference_mode():
        out = engine.pair.target.hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
            do_sample=False, pad_token_id=engine.tokenizer.eos_token_id, **extra)
    return {"seconds": time.perf_counter() - start, "tokens": out.shape[1] - ids.shape[1], "target_steps": None,
            "by_proposer": {}}


def total(runs: list[dict]) -> dict:
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    row = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    steps = [r["target_steps"] for r in runs]
    if None not in steps:
        row["tokens_per_step"] = tokens / sum(steps)
    by: dict[str, dict] = {}
    for r in runs:
        for name, counts in r["by_proposer"].items():
            slot = by.setdefault(name, {"num_drafted": 0, "num_accepted": 0})
            for key in slot:
                slot[key] += counts[key]
    row["by_proposer"] = by
    return row


def batch_one(engine, sets, max_tokens, k_fixed) -> dict[str, dict[str, dict]]:
    table = methods(k_fixed)
    runners = {name: (lambda p, o=o: run_helix(engine, [p], max_tokens, o)) for name, o in table.items()}
    runners["HF greedy"] = lambda p: run_hf(engine, p, max_tokens, None)
    runners["HF prompt lookup"] = lambda p: run_hf(engine, p, max_tokens, 10)
    for fn in runners.values():  # warm-up
        fn(sets["grounded"][0])
    runs = {kind: {name: [] for name in runners} for kind in sets}
    for kind, prompts in sets.items():
        for prompt in tqdm(prompts, desc=f"batch 1, {kind}"):
            for name, fn in runners.items():
                runs[kind][name].append(fn(prompt))
    rows = {kind: {name: total(r) for name, r in by_name.items()} for kind, by_name in runs.items()}
    rows["mixed"] = {name: total(runs["grounded"][name] + runs["chat"][name]) for name in runners}
    return rows


def proposer_cost(vocab: int, num_seqs: int = 32, length: int = 4096, k: int = 8, steps: int = 50) -> dict:
    """Prompt lookup's time per step for num_seqs sequences of `length` tokens (each grows by a token per
    step, as in decoding; tokens drawn from a 200-token alphabet so that matches are frequent)."""
    gen = torch.Generator().manual_seed(0)
    seqs = [Sequence(str(i), torch.randint(0, 200, (length,), generator=gen).tolist(), SamplingParams(),
                     torch.Generator()) for i in range(num_seqs)]
    proposer = NgramProposer()
    proposer.propose(seqs, k)  # builds each sequence's token tensor once
    start = time.perf_counter()
    for step in range(steps):
        for s in seqs:
            s.token_ids.append(step % vocab)
        proposer.propose(seqs, k)
    ms = (time.perf_counter() - start) / steps * 1e3
    return {"num_seqs": num_seqs, "length": length, "k": k, "ms_per_step": ms}


def goals(b1: dict, k_fixed: tuple[int, ...], lookup: dict) -> list[dict]:
    def tps(kind, name):
        return b1[kind][name]["tokens_per_s"]

    out = [{"goal": "ngram >= 2.5x K=0 on grounded prompts",
            "value": tps("grounded", "ngram planned") / tps("grounded", "K=0"), "target": 2.5}]
    best = max(tps("mixed", "draft planned"), tps("mixed", "ngram planned"))
    out.append({"goal": "hybrid >= the better of draft and ngram on the mixed set (within 3%)",
                "value": tps("mixed", "hybrid planned") / best, "target": 0.97})
    for kind in ("grounded", "chat", "mixed"):
        for family in ("draft", "ngram"):
            fixed = max(tps(kind, f"{family} K={k}") for k in k_fixed)
            out.append({"goal": f"{family} planned >= best fixed K within 5% ({kind}, batch 1)",
                        "value": tps(kind, f"{family} planned") / fixed, "target": 0.95})
    for kind in ("grounded", "chat"):
        base = tps(kind, "K=0")
        for name in ("draft planned", "ngram planned", "hybrid planned"):
            out.append({"goal": f"{name} >= 0.97x K=0 at 1 stream ({kind})", "value": tps(kind, name) / base,
                        "target": 0.97})
    out.append({"goal": "prompt lookup < 1 ms per step for 32 sequences of 4k tokens (lower is better)",
                "value": lookup["ms_per_step"], "target": 1.0, "met": lookup["ms_per_step"] < 1.0})
    for g in out:
        g.setdefault("met", g["value"] >= g["target"])
    return out


def report(b1: dict, checks: list[dict]) -> None:
    for kind, rows in b1.items():
        base = rows["K=0"]["tokens_per_s"]
        print(f"\nbatch 1, {kind} prompts")
        print(f"{'method':18} {'tok/s':>7} {'vs K=0':>7} {'tok/step':>8}  drafted/accepted by proposer")
        for name, r in rows.items():
            by = ", ".join(f"{p} {c['num_accepted']}/{c['num_drafted']}" for p, c in r["by_proposer"].items())
            step = f"{r['tokens_per_step']:8.2f}" if "tokens_per_step" in r else f"{'-':>8}"
            print(f"{name:18} {r['tokens_per_s']:7.1f} {r['tokens_per_s'] / base:7.2f} {step}  {by}")
    print("\ngoals")
    for g in checks:
        print(f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['value']:.2f} (target {g['target']})")


def plot(b1: dict, path: Path) -> None:
    fig, left = subplots(1, 1, figsize=(7, 4.5))
    names = [n for n in b1["grounded"] if not n.startswith("HF")] + ["HF prompt lookup"]
    width = 0.4
    for i, kind in enumerate(("grounded", "chat")):
        base = b1[kind]["K=0"]["tokens_per_s"]
        left.barh([y + i * width for y in range(len(names))], [b1[kind][n]["tokens_per_s"] / base for n in names],
                  height=width, label=kind)
    left.set_yticks([y + width / 2 for y in range(len(names))], names)
    left.invert_yaxis()
    left.axvline(1.0, color="k", lw=0.8)
    left.set_xlabel("speedup vs Helix K=0 (batch 1)")
    left.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_args(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--k-fixed", default="2,4,8")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="2 prompts per kind, 16 tokens")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(target_model=args.target, draft_model=args.draft, device=args.device,
                                    dtype=args.dtype, quantization=args.quantization))
    tokenizer = engine.tokenizer
    def encode(prompt: str) -> list[int]:  # chat template where the model has one (the test pairs do not)
        return chat_prompt_ids(tokenizer, prompt) if tokenizer.chat_template else tokenizer(prompt).input_ids

    sets = {kind: [encode(p) for p in prompts] for kind, prompts in (("grounded", GROUNDED), ("chat", CHAT))}
    max_tokens = args.max_tokens
    if args.quick:
        sets, max_tokens = {k: v[:2] for k, v in sets.items()}, 16
    k_fixed = tuple(int(k) for k in args.k_fixed.split(","))
    b1 = batch_one(engine, sets, max_tokens, k_fixed)
    lookup = proposer_cost(engine.pair.target.shape.vocab_size)
    checks = goals(b1, k_fixed, lookup)
    report(b1, checks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c, v = engine.cost_ratios
    result = {"args": vars(args), "dtype": str(engine.pair.target.dtype), "cost_ratios_now": {"c": c, "v": v},
              "batch_1": b1, "prompt_lookup_cost": lookup, "goals": checks}
    (out / "bench_planner.json").write_text(json.dumps(result, indent=2))
    plot(b1, out / "bench_planner.png")
    print(f"wrote {out / 'bench_planner.json'} and {out / 'bench_planner.png'}")


if __name__ == "__main__":
    main()
