"""F.linear vs Helix's weight-major projections (`model/paged_llm.py::linear`), side by side in one process.

For each batch size, fills a context, then times the target's decode forward (1 token per sequence) and
verify forward (K+1 tokens per sequence) with the weight-major path off (every projection through F.linear)
and on, alternating. The weight-major path applies to CPU fp32 only.

    python scripts/bench_linear.py --target smollm2-135m-instruct --dtype float32
    python scripts/bench_linear.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_common import add_pair_args, save_figure, subplots
from tqdm import tqdm

from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.model import paged_llm

MODES = {"F.linear": 0, "weight-major": paged_llm.WEIGHT_MAJOR_MAX_ROWS}  # the row limit each mode runs with


def time_forwards(engine: LLMEngine, batch: int, context: int, k: int, repeats: int) -> dict[str, float]:
    """Median ms of a decode and a verify forward per mode, the modes alternating within each repeat."""
    runner, blocks = engine.decoder.target, engine.block_manager
    tables = [[] for _ in range(batch)]
    for table in tables:
        assert blocks.ensure_slots(table, context + k + 1), "KV pool too small"
    tokens = [[(7 * i + t) % 1000 + 100 for t in range(context + k + 1)] for i in range(batch)]
    runner.logits(tables, [t[:context] for t in tokens], [0] * batch, [1] * batch)  # prefill the context
    passes = {n: lambda n=n: runner.logits(tables, [t[context - 1:context - 1 + n] for t in tokens],
                                           [context - 1] * batch, [n] * batch) for n in (1, k + 1)}
    samples: dict[str, list[float]] = {f"{mode} q{n}": [] for mode in MODES for n in passes}
    for _ in range(repeats):
        for mode, rows in MODES.items():
            paged_llm.WEIGHT_MAJOR_MAX_ROWS = rows
            for n, run in passes.items():
                run()  # warm: the same shapes just ran in the other mode
                start = time.perf_counter()
                run()
                samples[f"{mode} q{n}"].append(time.perf_counter() - start)
    paged_llm.WEIGHT_MAJOR_MAX_ROWS = MODES["weight-major"]
    for table in tables:
        blocks.release(table)
    return {key: 1e3 * statistics.median(values) for key, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_args(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 2, context 32, 3 repeats")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.context, args.repeats = [1, 2], 32, 3
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(target_model=args.target, draft_model=None, device=args.device, dtype=args.dtype,
                                    quantization=args.quantization, num_kv_blocks=max(args.batches) * (args.context // 16 + 2) + 8,
                                    enable_prefix_caching=False))
    rows = [{"batch": b, **time_forwards(engine, b, args.context, args.k, args.repeats)}
            for b in tqdm(args.batches, desc="batch")]
    q1, qv = "q1", f"q{args.k + 1}"
    print(f"\n{args.target}, {engine.pair.target.dtype}, context {args.context}, {args.threads} threads, "
          f"median of {args.repeats} (ms per target forward)")
    print(f"{'batch':>5} {'F.linear 1':>11} {'F.linear ' + str(args.k + 1):>11} {'weight-major 1':>15} "
          f"{'weight-major ' + str(args.k + 1):>15} {'decode gain':>11}")
    for r in rows:
        print(f"{r['batch']:5d} {r['F.linear ' + q1]:11.1f} {r['F.linear ' + qv]:11.1f} {r['weight-major ' + q1]:15.1f} "
              f"{r['weight-major ' + qv]:15.1f} {r['F.linear ' + q1] / r['weight-major ' + q1]:10.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_linear.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    fig, ax = subplots(figsize=(6, 4))
    for key, style in ((f"F.linear {q1}", "o--"), (f"F.linear {qv}", "s--"), (f"weight-major {q1}", "o-"),
                       (f"weight-major {qv}", "s-")):
        ax.plot([r["batch"] for r in rows], [r[key] for r in rows], style, label=key.replace("q", "tokens: "))
    ax.set(xscale="log", xlabel="sequences per forward", ylabel="ms per target forward",
           title="CPU projections: F.linear vs weight-major")
    ax.legend()
    save_figure(fig, out / "bench_linear.png")
    print(f"wrote {out / 'bench_linear.json'} and {out / 'bench_linear.png'}")


if __name__ == "__main__":
    main()
