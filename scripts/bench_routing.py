"""Multi-turn chats over engine replicas: prefix-cache hit rate and time to first token with one replica, with two
behind Serve's default router (power of two choices), and with two behind Helix's prefix-aware router.

Each configuration is served afresh on one local cluster (new replicas, empty prefix caches). Conversations run
concurrently, each one turn after another: the next turn sends the whole history (system prompt, a note about the
conversation's topic, every question and reply so far) plus a new question, so its prompt starts with the previous
one's. Between turns a user thinks (a seeded random pause, `--think-s` on average): without it, closed-loop clients
hand a least-loaded router an affinity of its own (the replica that just finished your turn is the least loaded
when your next one arrives). The hit rate is the prompt tokens served from a prefix cache over all prompt tokens
of the later turns (`usage.prompt_tokens_details.cached_tokens`); TTFT is measured by the client on
the stream (first content chunk), later turns only.

    python scripts/bench_routing.py                 # real pair, 8 conversations x 4 turns, ~10 min on 2 cores
    python scripts/bench_routing.py --quick         # toy pair, smoke
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

import httpx
from bench_common import cpu_name, save_figure, subplots
from ray import serve

from helix_serve.config import DEFAULT_DRAFT, DEFAULT_TARGET
from helix_serve.serving.local import build_graph, local_cluster

MODEL = "helix-bench"
ROUTER = {"request_router_class": "helix_serve.serving.prefix_router.PrefixAffinityRouter",
          "request_router_kwargs": {"imbalance_threshold": 4}}
CONFIGS = {"1 replica": (1, None), "2 replicas, default router": (2, None), "2 replicas, prefix router": (2, ROUTER)}
SYSTEM = ("You are Helix, a concise assistant. Answer in two or three sentences, plainly, without lists, and say "
          "so when you do not know.")
TOPICS = ["the river Nile", "honey bees", "black holes", "the blue sky", "bicycles", "the seasons", "vaccines",
          "the Pythagorean theorem", "mountains", "octopuses", "the compass", "autumn leaves"]
NOTE = ["{t} has been studied for centuries by scientists, travellers and curious children alike.",
        "Many books about {t} begin with a simple question and end with a long list of new ones.",
        "A teacher once explained {t} to a class of forty pupils using only chalk and a map.",
        "Museums often hold exhibitions on {t}, with models, drawings and old photographs.",
        "The earliest written records that mention {t} are several thousand years old.",
        "Today researchers use satellites, microscopes and computers to learn more about {t}.",
        "Some of the most popular questions people ask about {t} have surprisingly simple answers.",
        "Others remain open, and whole careers have been spent trying to settle them.",
        "In many languages the word for {t} is also used in proverbs and children's songs.",
        "This note was written to help a reader prepare for a short conversation about {t}."]
# Each conversation opens on its own long note (a document to chat about), so its history is worth keeping.
OPENERS = [" ".join(line.format(t=t) for line in NOTE) + f"\n\nUsing the note, tell me about {t}." for t in TOPICS]
FOLLOW_UPS = ["Can you say more?", "Why is that?", "Give me an example.", "What else should I know?"]
HIT_GOAL, TTFT_GOAL = 0.9, 0.6


def conversation(http: httpx.Client, opener: str, turns: int, max_tokens: int, think_s: float, seed: int,
                 out: list[dict]) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opener}]
    rng = random.Random(seed)
    for turn in range(turns):
        if turn:
            time.sleep(think_s * rng.uniform(0.25, 1.75))
        start, first, text, usage = time.perf_counter(), None, [], None
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
        out.append({"turn": turn, "ttft_s": (first or time.perf_counter()) - start,
                    "prompt_tokens": usage["prompt_tokens"],
                    "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]})
        messages += [{"role": "assistant", "content": "".join(text)},
                     {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]


def run_config(url: str, args: dict, replicas: int, router: dict | None, conversations: int, turns: int,
               max_tokens: int, think_s: float) -> dict:
    """Serve the configuration on the running cluster (fresh replicas: empty prefix caches) and chat with it."""
    engine = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0.5}}
    if router:
        engine["request_router_config"] = router
    serve.delete("helix")
    serve.run(build_graph(args, engine, {"ray_actor_options": {"num_cpus": 0.25}}), name="helix", route_prefix="/")
    records: list[dict] = []
    with httpx.Client(base_url=url, timeout=600) as http:
        http.post("/v1/completions", json={"model": MODEL, "prompt": "warm up", "max_tokens": 2})
        threads = [threading.Thread(target=conversation, args=(http, OPENERS[i % len(OPENERS)], turns, max_tokens,
                                                                think_s, i, records)) for i in range(conversations)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
    return summarize(records, seconds)


def summarize(records: list[dict], seconds: float) -> dict:
    """Hit rate and TTFT percentiles of the later turns (the first turn of a conversation has no history)."""
    later = [r for r in records if r["turn"] > 0]
    ttfts = sorted(r["ttft_s"] for r in later)
    return {"turns": len(records), "seconds": seconds,
            "hit_rate": sum(r["cached_tokens"] for r in later) / max(sum(r["prompt_tokens"] for r in later), 1),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "records": records}


def report(results: dict) -> list[dict]:
    print(f"\n{'configuration':<28} {'hit rate':>9} {'TTFT p50':>10} {'TTFT p99':>10} {'wall':>8}")
    for name, r in results.items():
        print(f"{name:<28} {r['hit_rate']:9.2f} {1000 * r['ttft_p50_s']:8.0f}ms {1000 * r['ttft_p99_s']:8.0f}ms "
              f"{r['seconds']:7.1f}s")
    one, default, prefix = (results[name] for name in CONFIGS)
    hit = prefix["hit_rate"] / max(one["hit_rate"], 1e-9)
    ttft = prefix["ttft_p50_s"] / default["ttft_p50_s"]
    checks = [{"goal": f"prefix router hit rate >= {HIT_GOAL}x one replica's", "value": hit, "target": HIT_GOAL,
               "met": hit >= HIT_GOAL},
              {"goal": f"prefix router TTFT p50 <= {TTFT_GOAL}x the default router's", "value": ttft,
               "target": TTFT_GOAL, "met": ttft <= TTFT_GOAL}]
    print("\ngoals")
    for g in checks:
        print(f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['value']:.3f} (target {g['target']})")
    return checks


def plot(results: dict, path: Path) -> None:
    fig, (left, right) = subplots(1, 2, figsize=(11, 4))
    names = list(results)
    left.bar(range(len(names)), [results[n]["hit_rate"] for n in names])
    left.set_ylabel("prefix-cache hit rate, later turns")
    right.bar([i - 0.2 for i in range(len(names))], [1000 * results[n]["ttft_p50_s"] for n in names], 0.4,
              label="p50")
    right.bar([i + 0.2 for i in range(len(names))], [1000 * results[n]["ttft_p99_s"] for n in names], 0.4,
              label="p99")
    right.set_ylabel("TTFT of later turns (ms)")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--think-s", type=float, default=3.0, help="a user's mean pause between turns")
    parser.add_argument("--quick", action="store_true", help="4 conversations x 2 turns, 8 tokens, no pause")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.turns, args.max_tokens, args.think_s = 4, 2, 8, 0.0
    # One torch thread per replica: two replicas share the two cores.
    app_args = {"target_model": args.target, "draft_model": args.draft, "dtype": args.dtype, "device": "cpu",
                "served_model_name": MODEL, "torch_threads": 1, "num_kv_blocks": 512}
    with local_cluster(log_to_driver=False) as url:
        results = {name: run_config(url, app_args, replicas, router, args.conversations, args.turns, args.max_tokens,
                                    args.think_s) for name, (replicas, router) in CONFIGS.items()}
    checks = report(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "cpu": cpu_name()}
    (out / "bench_routing.json").write_text(json.dumps({**meta, "results": results, "goals": checks}, indent=2))
    plot(results, out / "bench_routing.png")
    print(f"CPU: {meta['cpu']}; wrote {out / 'bench_routing.json'} and {out / 'bench_routing.png'}")


if __name__ == "__main__":
    main()
