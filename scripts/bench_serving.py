"""Serving under load: N concurrent SSE streams against the running Serve app, speculative vs not,
plus KV memory (reserved vs live bytes, and a contiguous max-length cache for comparison). When it starts the app
itself it also loads the same engine settings in-process ("engine alone") and measures batch 1 in paired rounds
(served and alone back to back, the order alternating by round, for each of speculative and plain,
`--paired-rounds` times), so the serving path's cost at
batch 1 is printed as served ÷ engine alone per round: this machine's speed drifts by tens of percent over minutes,
and only side-by-side slices cancel that.

Loopback only, bounded: each concurrency level sends `--requests-per-stream` requests per stream.

    python scripts/bench_serving.py                          # starts the app on the embedded pair itself
    python scripts/bench_serving.py --url http://127.0.0.1:8000   # an app started with serve run
    python scripts/bench_serving.py --quick                  # small smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx
from bench_common import PROMPTS, save_figure, subplots
from tqdm import tqdm

from helix_serve.config import QUANTIZATIONS


async def one_stream(client: httpx.AsyncClient, prompt: str, max_tokens: int, speculative: bool) -> dict:
    """One /generate/stream request: TTFT, per-token gaps, tokens."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "speculative": speculative, "ignore_eos": True}
    start = time.perf_counter()
    last, ttft, tokens, event = start, None, 0, None
    bursts: list[list[float]] = []  # [gap before the burst, its tokens]: chunks read within 1 ms are one burst
    async with client.stream("POST", "/generate/stream", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "chunk":
                n = len(json.loads(line[5:]).get("token_ids", []))
                if not n:
                    continue
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - start
                elif bursts and now - last < 1e-3:
                    bursts[-1][1] += n
                else:
                    bursts.append([now - last, n])
                last, tokens = now, tokens + n
    # tokens that arrive together share the gap before them (the replica sends several steps in one message)
    gaps = [gap / n for gap, n in bursts for _ in range(int(n))]
    return {"ttft": ttft, "gaps": gaps, "tokens": tokens, "latency": time.perf_counter() - start}


async def kv_sampler(client: httpx.AsyncClient, samples: list[dict], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            samples.append(find_kv((await client.get("/health", timeout=5)).json()))
        except (httpx.HTTPError, ValueError):
            pass
        await asyncio.sleep(0.2)


def find_kv(obj) -> dict:
    """The first KV-usage dict in a /health answer (single pool or per-pool layouts)."""
    if isinstance(obj, dict):
        if "used_blocks" in obj:
            return obj
        for value in obj.values():
            found = find_kv(value)
            if found:
                return found
    if isinstance(obj, list):
        for value in obj:
            found = find_kv(value)
            if found:
                return found
    return {}


async def level(url: str, concurrency: int, per_stream: int, max_tokens: int, speculative: bool) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        kv: list[dict] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(kv_sampler(client, kv, stop))

        async def worker(w: int) -> list[dict]:
            return [await one_stream(client, PROMPTS[(w + i) % len(PROMPTS)], max_tokens, speculative)
                    for i in range(per_stream)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(concurrency))) for r in rs]
        elapsed = time.perf_counter() - start
        stop.set()
        await sampler
    gaps = sorted(g for r in results for g in r["gaps"])
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    return {
        "concurrency": concurrency, "speculative": speculative, "requests": len(results),
        "tokens_per_s": sum(r["tokens"] for r in results) / elapsed, "requests_per_s": len(results) / elapsed,
        "ttft_p50_ms": 1e3 * pct(ttfts, 0.5), "ttft_p99_ms": 1e3 * pct(ttfts, 0.99),
        "itl_p50_ms": 1e3 * pct(gaps, 0.5) if gaps else None, "itl_p99_ms": 1e3 * pct(gaps, 0.99) if gaps else None,
        "kv": kv_summary(kv),
    }


def kv_summary(samples: list[dict]) -> dict:
    """Peak reserved vs live KV bytes, and what contiguous max-length caches would reserve."""
    busy = [s for s in samples if s.get("num_running")]
    if not busy:
        return {}
    peak = max(busy, key=lambda s: s["reserved_bytes"])
    bpt = peak["bytes_per_token"]
    waste = [1 - s["live_tokens"] * bpt / s["reserved_bytes"] for s in busy if s["reserved_bytes"]]
    return {"peak_reserved_bytes": peak["reserved_bytes"], "peak_live_bytes": peak["live_tokens"] * bpt,
            "mean_waste_pct": 100 * statistics.mean(waste) if waste else None,
            "contiguous_bytes_at_peak": peak["num_running"] * peak.get("max_model_len", 0) * bpt,
            "peak_running": peak["num_running"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an app already running (default: start one here)")
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--eagle-head", help="an EAGLE head for the target (the default pair's: smollm2-eagle)")
    parser.add_argument("--dtype", default="float32", help="the app's `dtype` (auto: bf16 where the CPU has it)")
    parser.add_argument("--engine-threads", type=int, default=1)
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="auto", help="the app's `quantization`")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 4, 16 tokens")
    parser.add_argument("--serve-env", nargs="*", default=[], metavar="KEY=VALUE", type=env_item,
                        help="environment for the cluster this script starts (not with --url), e.g. Ray Serve's "
                             "switches")
    parser.add_argument("--paired-rounds", type=int, default=3,
                        help="rounds of paired served / alone batch-1 measurements (when this script starts the app)")
    parser.add_argument("--stream-interval-s", type=float, default=None,
                        help="the engine deployments' `stream_interval_s` (user_config; default: the app's)")
    parser.add_argument("--cpu-cores", type=int, nargs="+", default=None,
                        help="the app's `cpu_cores` (the engine replica's cores); this script and the cluster it "
                             "starts keep off them, as under `helix serve`; the in-process engine runs on them")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.max_tokens, args.requests_per_stream = [1, 4], 16, 1
    if args.url:
        rows = run_levels(args.url, args)
    else:
        from helix_serve.serving.app_config import BatchingConfig
        from helix_serve.serving.local import build_graph, local_serve

        app_args = {"device": "cpu", "dtype": args.dtype, "max_num_seqs": 32, "torch_threads": args.engine_threads,
                    "quantization": args.quantization, "cpu_cores": args.cpu_cores}
        if args.target:
            app_args.update(target_model=args.target, draft_model=args.draft, eagle_head=args.eagle_head)
        batching = {} if args.stream_interval_s is None else {"stream_interval_s": args.stream_interval_s}
        engine_options = {"user_config": BatchingConfig(**batching).model_dump()}
        alone = EngineAlone(app_args, args)
        with local_serve(build_graph(app_args, engine_options), env=dict(args.serve_env), log_to_driver=False,
                         reserved_cores=args.cpu_cores or ()) as url:
            for speculative in (True, False):  # the replica's first requests pay its warm-up (TTFT 2x here)
                asyncio.run(level(url, 1, 1, 8, speculative))
            rows = run_levels(url, args)
            rows += paired_rounds(url, alone, args)
    report(rows, args)


def env_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not key or not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


class EngineAlone:
    """The app's engine settings on an in-process engine (no serving path): batch-1 tokens/s per method."""

    def __init__(self, app_args: dict, args):
        import torch

        from helix_serve.engine.llm_engine import LLMEngine
        from helix_serve.serving.app_config import HelixAppArgs

        torch.set_num_threads(args.engine_threads)
        self.engine = LLMEngine(HelixAppArgs(**app_args).engine_config())
        self.args = args

    def rate(self, speculative: bool) -> float:
        """On the replica's cores when it has reserved ones (it idles meanwhile): the same core, no serving path."""
        from helix_serve.engine.sampling_params import SamplingParams
        from helix_serve.serving.cpu_affinity import move_process

        params = SamplingParams(max_tokens=self.args.max_tokens, speculative=speculative, ignore_eos=True)
        home = os.sched_getaffinity(0) if self.args.cpu_cores else None
        if home is not None:
            move_process(self.args.cpu_cores)
        try:
            start, tokens = time.perf_counter(), 0
            for i in range(self.args.requests_per_stream):
                [out] = self.engine.generate([PROMPTS[i % len(PROMPTS)]], params)
                tokens += len(out.token_ids)
            return tokens / (time.perf_counter() - start)
        finally:
            if home is not None:
                move_process(home)


def paired_rounds(url: str, alone: EngineAlone, args) -> list[dict]:
    """Batch 1 served and alone back to back, per method and round: the rows of served ÷ engine alone."""
    for speculative in (True, False):  # warm-up, as the server's first request warms the replica
        alone.rate(speculative)
    rows = []
    for round_ in tqdm(range(args.paired_rounds), desc="paired rounds"):
        for speculative in (True, False):
            if round_ % 2 == 0:  # alternate the order: drift and order effects cancel over rounds
                served, alone_rate = served_rate(url, args, speculative), alone.rate(speculative)
            else:
                alone_rate, served = alone.rate(speculative), served_rate(url, args, speculative)
            rows.append({"concurrency": 1, "speculative": speculative, "paired_round": round_,
                         "served_tokens_per_s": served, "engine_alone_tokens_per_s": alone_rate})
    return rows


def served_rate(url: str, args, speculative: bool) -> float:
    return asyncio.run(level(url, 1, args.requests_per_stream, args.max_tokens, speculative))["tokens_per_s"]


def run_levels(url: str, args) -> list[dict]:
    return [asyncio.run(level(url, concurrency, args.requests_per_stream, args.max_tokens, speculative))
            for concurrency in tqdm(args.concurrency, desc="concurrency") for speculative in (True, False)]


def report(rows: list[dict], args) -> None:
    print(f"\nserving load, {args.max_tokens} tokens per request, {args.requests_per_stream} requests per stream")
    print(f"{'streams':>7} {'spec':>5} {'tok/s':>8} {'req/s':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
          f"{'ITL p99':>8} {'KV waste':>8} {'KV paged/contig':>15}")
    paired = [r for r in rows if "paired_round" in r]
    rows = [r for r in rows if "paired_round" not in r]
    for r in rows:
        kv = r["kv"]
        ratio = (f"{kv['peak_reserved_bytes'] / kv['contiguous_bytes_at_peak']:.2f}"
                 if kv.get("contiguous_bytes_at_peak") else "-")
        waste = f"{kv['mean_waste_pct']:.1f}%" if kv.get("mean_waste_pct") is not None else "-"
        fmt = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        print(f"{r['concurrency']:7d} {str(r['speculative']):>5} {r['tokens_per_s']:8.1f} {r['requests_per_s']:6.2f} "
              f"{fmt(r['ttft_p50_ms']):>9} {fmt(r['ttft_p99_ms']):>9} {fmt(r['itl_p50_ms']):>8} "
              f"{fmt(r['itl_p99_ms']):>8} {waste:>8} {ratio:>15}")
    served_vs_alone = {}
    for spec in (True, False):
        pairs = [(r["served_tokens_per_s"], r["engine_alone_tokens_per_s"]) for r in paired if r["speculative"] is spec]
        if not pairs:
            continue
        name = "speculative" if spec else "plain"
        ratios = [served / alone for served, alone in pairs]
        served_vs_alone[name] = {"median": statistics.median(ratios), "rounds": ratios}
        print(f"batch 1, {name}, served ÷ engine alone by round (tok/s served/alone): "
              + ", ".join(f"{x:.2f} ({s:.1f}/{a:.1f})" for x, (s, a) in zip(ratios, pairs))
              + f"; median {statistics.median(ratios):.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serving.json").write_text(json.dumps({"args": vars(args), "rows": rows, "paired": paired,
                                                         "served_vs_engine_alone": served_vs_alone}, indent=2))
    fig, (left, right) = subplots(1, 2, figsize=(11, 4))
    for spec, style in ((True, "o-"), (False, "s--")):
        sel = [r for r in rows if r["speculative"] is spec]
        label = "speculative" if spec else "plain (K=0)"
        left.plot([r["concurrency"] for r in sel], [r["tokens_per_s"] for r in sel], style, label=label)
        right.plot([r["concurrency"] for r in sel], [r["itl_p50_ms"] or 0 for r in sel], style, label=f"{label} p50")
        right.plot([r["concurrency"] for r in sel], [r["itl_p99_ms"] or 0 for r in sel], style, alpha=0.4,
                   label=f"{label} p99")
    left.set(xscale="log", xlabel="concurrent streams", ylabel="tokens / s", title="throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms per token",
              title="inter-token latency")
    left.legend()
    right.legend()
    save_figure(fig, out / "bench_serving.png")
    print(f"wrote {out / 'bench_serving.json'} and {out / 'bench_serving.png'}")


if __name__ == "__main__":
    main()
