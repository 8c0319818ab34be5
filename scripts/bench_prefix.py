"""Prefix caching: time to first token after a long shared prefix, and multi-turn chat throughput, with
caching on and off on the same model pair.

Two engines share one loaded pair and the same calibrated costs (so adaptive K decides alike):
- ttft: per trial a fresh prefix of --prefix-tokens tokens (1,000 by default, capped by the context),
  then requests that share it, one at a time. TTFT of the first (cold) vs the later ones (warm).
- chat: --sessions conversations of --turns turns on one shared system prompt; each turn's prompt is
  the previous prompt + the reply + a new user message, as token ids (the history is exact), and the
  turns of all sessions run as one batch. Throughput = generated tokens / wall time. Each repeat uses
  a fresh system prompt, so nothing carries over from the previous repeat.
Goals (issue 15): warm TTFT <= 0.25 x cold; chat throughput >= 1.5 x caching off; 0 blocks in use after.

    python scripts/bench_prefix.py            # default pair
    python scripts/bench_prefix.py --quick    # CI smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

import torch
from bench_common import CHAT_QUESTIONS, add_pair_args, save_figure, subplots
from tqdm import tqdm

from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams

WORDS = ("the of and to in is was for on that with as by at from his her it an be this which or are had not but "
         "king queen castle river market letter garden winter summer morning evening soldier sailor merchant "
         "answer question reason story music silver golden quiet sudden careful ancient bright dark").split()


def filler_ids(engine: LLMEngine, num_tokens: int, seed: int) -> list[int]:
    """`num_tokens` token ids of seeded pseudo-English (a stand-in for a system prompt or a document)."""
    rng = random.Random(seed)
    words = " ".join(rng.choice(WORDS) for _ in range(num_tokens))
    return engine.tokenizer(words).input_ids[:num_tokens]


def user_ids(engine: LLMEngine, session: int, turn: int) -> list[int]:
    question = CHAT_QUESTIONS[(session + turn) % len(CHAT_QUESTIONS)]
    return engine.tokenizer(f"\nUser {session}: {question}\nAssistant:", add_special_tokens=False).input_ids


def make_engines(args) -> dict[bool, LLMEngine]:
    draft = None if args.draft.lower() == "none" else args.draft  # --draft none: the target alone
    config = EngineConfig(target_model=args.target, draft_model=draft, device=args.device, dtype=args.dtype, quantization=args.quantization,
                          num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=True)
    on = LLMEngine(config)
    c, v = on.cost_ratios
    off_config = dataclasses.replace(config, enable_prefix_caching=False, draft_cost_ratio=c, verify_cost_ratio=v)
    return {True: on, False: LLMEngine(off_config, pair=on.pair)}


def ttft_of(engine: LLMEngine, prompt: list[int], max_tokens: int) -> float:
    [out] = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return out.stats["time_to_first_token"]


def bench_ttft(engines: dict[bool, LLMEngine], args, prefix_tokens: int) -> dict:
    """Per trial: a fresh prefix, then 1 + followers requests sharing it, on each engine."""
    times: dict[str, list[float]] = {"cold": [], "warm": [], "off": []}
    for trial in tqdm(range(args.trials), desc="ttft trials"):
        prefix = filler_ids(engines[True], prefix_tokens, seed=1000 + trial)
        prompts = [prefix + user_ids(engines[True], trial, j) for j in range(1 + args.followers)]
        for on, engine in engines.items():
            ttfts = [ttft_of(engine, p, args.ttft_max_tokens) for p in prompts]
            if on:
                times["cold"].append(ttfts[0])
                times["warm"] += ttfts[1:]
            else:
                times["off"] += ttfts
    row = {f"{k}_ttft_ms": 1000 * statistics.median(v) for k, v in times.items()}
    row["warm_over_cold"] = row["warm_ttft_ms"] / row["cold_ttft_ms"]
    row["prefix_tokens"] = prefix_tokens
    return row


def chat_run(engine: LLMEngine, system: list[int], args) -> dict:
    """All sessions' turns as batches; returns tokens, time and the replies."""
    params = SamplingParams(max_tokens=args.reply_tokens, ignore_eos=True)
    prompts = [system + user_ids(engine, s, 0) for s in range(args.sessions)]
    replies, generated, cached, prompt_tokens = [], 0, 0, 0
    start = time.perf_counter()
    for turn in range(args.turns):
        outs = engine.generate(prompts, params)
        replies.append([o.token_ids for o in outs])
        generated += sum(len(o.token_ids) for o in outs)
        cached += sum(o.stats["num_cached_tokens"] for o in outs)
        prompt_tokens += sum(len(p) for p in prompts)
        prompts = [p + o.token_ids + user_ids(engine, s, turn + 1) for s, (p, o) in enumerate(zip(prompts, outs))]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": generated, "prompt_tokens": prompt_tokens, "cached_tokens": cached,
            "replies": replies}


def bench_chat(engines: dict[bool, LLMEngine], args, system_tokens: int) -> dict:
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for rep in tqdm(range(args.repeats), desc="chat repeats"):
        system = filler_ids(engines[True], system_tokens, seed=rep)
        order = (True, False) if rep % 2 == 0 else (False, True)  # alternate so drift hits both alike
        for on in order:
            runs[on].append(chat_run(engines[on], system, args))
    row = {"system_tokens": system_tokens, "sessions": args.sessions, "turns": args.turns,
           "reply_tokens": args.reply_tokens}
    for on, label in ((True, "on"), (False, "off")):
        tokens, seconds = sum(r["tokens"] for r in runs[on]), sum(r["seconds"] for r in runs[on])
        row[f"{label}_tokens_per_s"] = tokens / seconds
        row[f"{label}_seconds"] = seconds
        row[f"{label}_cached_fraction"] = (sum(r["cached_tokens"] for r in runs[on])
                                           / sum(r["prompt_tokens"] for r in runs[on]))
    row["speedup"] = row["on_tokens_per_s"] / row["off_tokens_per_s"]
    row["identical"] = all(a["replies"] == b["replies"] for a, b in zip(runs[True], runs[False]))
    return row


def sizes(engine: LLMEngine, args) -> tuple[int, int]:
    """Prefix lengths that fit the context: the TTFT prefix, and the chat system prompt."""
    room = engine.max_model_len - 32  # a user message
    ttft = min(args.prefix_tokens, room - args.ttft_max_tokens)
    chat = min(args.prefix_tokens, room - args.turns * (32 + args.reply_tokens))
    if chat < 16:
        raise SystemExit(f"--turns x --reply-tokens leave no room for a system prompt in {engine.max_model_len}")
    return ttft, chat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_args(parser)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=3, help="fresh prefixes in the TTFT workload")
    parser.add_argument("--followers", type=int, default=3, help="requests after the first, per prefix")
    parser.add_argument("--ttft-max-tokens", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="short prefixes, 1 trial, 2 sessions x 2 turns")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.prefix_tokens, args.trials, args.followers, args.repeats = 96, 1, 1, 1
        args.sessions, args.turns, args.reply_tokens, args.num_kv_blocks = 2, 2, 8, 256
    torch.set_num_threads(args.threads)
    engines = make_engines(args)
    ttft_tokens, chat_tokens = sizes(engines[True], args)
    ttft_of(engines[True], filler_ids(engines[True], 64, seed=-1), 4)  # warm-up (one-off allocations)
    ttft_of(engines[False], filler_ids(engines[True], 64, seed=-1), 4)
    ttft = bench_ttft(engines, args, ttft_tokens)
    chat = bench_chat(engines, args, chat_tokens)
    after = {("on" if on else "off"): e.kv_usage() for on, e in engines.items()}
    report(engines[True], args, ttft, chat, after)


def report(engine: LLMEngine, args, ttft: dict, chat: dict, after: dict) -> None:
    in_use = {k: u["used_blocks"] for k, u in after.items()}
    print(f"\n{engine.pair.target.dtype}, device {args.device}, {torch.get_num_threads()} threads, "
          f"block size {engine.block_manager.block_size}")
    print(f"TTFT, prefix of {ttft['prefix_tokens']} tokens ({args.trials} trials x {1 + args.followers} requests):")
    print(f"  {'cold (first, caching on)':28} {ttft['cold_ttft_ms']:9.1f} ms")
    print(f"  {'warm (prefix seen)':28} {ttft['warm_ttft_ms']:9.1f} ms   {ttft['warm_over_cold']:.3f} x cold "
          f"(goal <= 0.25)")
    print(f"  {'caching off':28} {ttft['off_ttft_ms']:9.1f} ms")
    print(f"chat: {chat['sessions']} sessions x {chat['turns']} turns x {chat['reply_tokens']} tokens, system prompt "
          f"{chat['system_tokens']} tokens, {args.repeats} repeats:")
    for label in ("off", "on"):
        print(f"  caching {label:4} {chat[f'{label}_tokens_per_s']:9.1f} tok/s   {chat[f'{label}_seconds']:7.2f} s   "
              f"prompt tokens from cache {100 * chat[f'{label}_cached_fraction']:5.1f}%")
    print(f"  speedup {chat['speedup']:.2f}x (goal >= 1.5); replies identical on/off: {chat['identical']}")
    print(f"blocks in use after the runs: {in_use}; cached blocks (free, reusable): {after['on']['cached_blocks']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "ttft": ttft, "chat": chat, "blocks_in_use_after": in_use,
              "kv_after": after, "dtype": str(engine.pair.target.dtype)}
    (out / "bench_prefix.json").write_text(json.dumps(result, indent=2))
    plot(ttft, chat, out / "bench_prefix.png")
    print(f"wrote {out / 'bench_prefix.json'} and {out / 'bench_prefix.png'}")


def plot(ttft: dict, chat: dict, path: Path) -> None:
    fig, (left, right) = subplots(1, 2, figsize=(10, 3.8))
    names = ["cold", "warm", "off"]
    left.bar(names, [ttft[f"{n}_ttft_ms"] for n in names], color=["#999", "#2a9d8f", "#e76f51"])
    left.set_ylabel("TTFT (ms, median)")
    left.set_title(f"prefix {ttft['prefix_tokens']} tokens: warm = {ttft['warm_over_cold']:.2f} x cold")
    right.bar(["caching off", "caching on"], [chat["off_tokens_per_s"], chat["on_tokens_per_s"]],
              color=["#e76f51", "#2a9d8f"])
    right.set_ylabel("generated tokens / s")
    right.set_title(f"multi-turn chat: {chat['speedup']:.2f}x")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
