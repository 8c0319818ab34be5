"""Where one forward of Helix's paged model spends its time: 1 vs K+1 query tokens per sequence.

Fills a context of --context tokens for --batch sequences, then times and profiles (torch.profiler)
a decode forward (1 token per sequence) and a verify forward (K+1 tokens per sequence). Prints the
ratio and the top ops of each, and writes JSON.

    python scripts/profile_forward.py --target smollm2-135m-instruct --dtype float32 --batch 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_common import add_pair_args

from helix_serve.config import EngineConfig
from helix_serve.engine.step_cost import median_time
from helix_serve.engine.llm_engine import LLMEngine


def _top_ops(fn, rows: int) -> list[dict]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in ops]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_args(parser)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(target_model=args.target, draft_model=None, device=args.device, dtype=args.dtype,
                                    quantization=args.quantization,
                                    num_kv_blocks=args.batch * (args.context + args.k + 16) // 16 + 8))
    runner, bm = engine.decoder.target, engine.block_manager
    tables = [[] for _ in range(args.batch)]
    for table in tables:
        assert bm.ensure_slots(table, args.context + args.k + 1)
    tokens = [[(7 * i + t) % 1000 + 100 for t in range(args.context + args.k + 1)] for i in range(args.batch)]
    runner.logits(tables, [t[: args.context] for t in tokens], [0] * args.batch, [1] * args.batch)

    def forward(n: int):
        chunks = [t[args.context - 1 : args.context - 1 + n] for t in tokens]
        return lambda: runner.logits(tables, chunks, [args.context - 1] * args.batch, [n] * args.batch)

    result = {"args": vars(args), "dtype": str(runner.model.dtype)}
    for name, n in (("decode", 1), ("verify", args.k + 1)):
        fn = forward(n)
        fn()
        result[name] = {"ms": 1e3 * median_time(fn, args.repeats), "top_ops": _top_ops(fn, 12)}
    ratio = result["verify"]["ms"] / result["decode"]["ms"]
    result["verify_over_decode"] = ratio
    print(f"{args.target} {result['dtype']} batch {args.batch} context {args.context}: decode "
          f"{result['decode']['ms']:.2f} ms, verify of {args.k + 1} tokens {result['verify']['ms']:.2f} ms "
          f"({ratio:.2f}x)")
    for name in ("decode", "verify"):
        print(f"\n{name}: top ops by self CPU time")
        for op in result[name]["top_ops"]:
            print(f"  {op['op']:48} {op['self_ms']:8.2f} ms  {op['calls']:5d} calls")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_int4" if args.quantization == "int4" else ""
    path = out / f"profile_forward_b{args.batch}_{args.dtype}{suffix}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
