"""A target forward of T tokens with its fp32 projections at the measured widths (`model/row_padding.py`) vs as
they come, side by side in one process (the two alternating within each repeat).

T tokens as one sequence (a prefill chunk) and as rows of 4 + 1 tokens (verify passes, T a multiple of 5) at a
short context, for T up to 64. The widths apply to CPU fp32 only (with `--quantization int4`, the LM head's
rows beyond the 8-bit kernel's). Prints a table and writes JSON and a plot; the physical limit beside it is one
read of the weights at the measured streaming bandwidth.

    python scripts/bench_row_padding.py --dtype float32
    python scripts/bench_row_padding.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_common import add_pair_args, bandwidth_limit, cpu_name, save_figure, subplots
from tqdm import tqdm

from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine

CONTEXT = 64


def time_pass(engine: LLMEngine, rows: int, per_row: int, repeats: int) -> dict[str, float]:
    """Median ms of one forward of `rows` sequences × `per_row` new tokens, unpadded and padded, alternating."""
    runner, model = engine.decoder.target, engine.pair.target
    tables = [[] for _ in range(rows)]
    for table in tables:
        assert engine.block_manager.ensure_slots(table, CONTEXT + per_row), "KV pool too small"
    tokens = [[(7 * i + t) % 1000 + 100 for t in range(CONTEXT + per_row)] for i in range(rows)]
    runner.logits(tables, [t[:CONTEXT] for t in tokens], [0] * rows, [1] * rows)  # the context
    measured = model.row_widths
    modes = {"as they come": (), "padded": measured}
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode, widths in modes.items():
            model.row_widths = widths
            start = time.perf_counter()
            runner.logits(tables, [t[CONTEXT:] for t in tokens], [CONTEXT] * rows, [per_row] * rows)
            samples[mode].append(time.perf_counter() - start)
    model.row_widths = measured
    for table in tables:
        engine.block_manager.release(table)
    tokens_in = rows * per_row
    width = measured[tokens_in] if tokens_in < len(measured) else tokens_in
    return {"tokens": tokens_in, "rows": rows, "width": width,
            **{mode: 1e3 * statistics.median(values) for mode, values in samples.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_args(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="up to 20 tokens, 3 repeats")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.repeats = 20, 3
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(target_model=args.target, draft_model=None, device=args.device, dtype=args.dtype,
                                    quantization=args.quantization, num_kv_blocks=args.max_tokens * 8 + 64,
                                    enable_prefix_caching=False, draft_cost_ratio=0.3, verify_cost_ratio=0.0))
    if not engine.pair.target.row_widths:
        raise SystemExit("row widths apply to CPU fp32 models only (--dtype float32 on a CPU)")
    shapes = [(1, t) for t in range(1, args.max_tokens + 1)] + [(t // 5, 5) for t in range(5, args.max_tokens + 1, 5)]
    rows = [{"layout": "sequence" if i < args.max_tokens else "verify", **time_pass(engine, r, n, args.repeats)}
            for i, (r, n) in enumerate(tqdm(shapes, desc="passes"))]
    limit = bandwidth_limit(engine)
    cpu = cpu_name()
    print(f"\n{args.target}, {engine.pair.target.dtype}, {args.quantization}, {args.threads} threads, {cpu}; median of "
          f"{args.repeats}; limit: one read of {limit['weight_bytes'] / 1e6:.0f} MB at "
          f"{limit['gemv_bytes_per_s'] / 1e9:.1f} GB/s = {1e3 * limit['limit_step_s']:.1f} ms")
    print(f"{'tokens':>6} {'rows':>4} {'width':>5} {'as they come':>13} {'padded':>8} {'gain':>6}")
    for r in rows:
        print(f"{r['tokens']:6d} {r['rows']:4d} {r['width']:5d} {r['as they come']:13.1f} {r['padded']:8.1f} "
              f"{r['as they come'] / r['padded']:5.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_row_padding.json").write_text(json.dumps({"args": vars(args), "cpu": cpu, "limit": limit,
                                                            "widths": list(engine.pair.target.row_widths),
                                                            "rows": rows}, indent=2))
    fig, axes = subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], "sequence", "one sequence of T tokens"), (axes[1], "verify", "rows of 5 tokens"))
    for ax, layout, title in panels:
        picked = [r for r in rows if r["layout"] == layout]
        for mode, style in (("as they come", "o--"), ("padded", "s-")):
            ax.plot([r["tokens"] for r in picked], [r[mode] for r in picked], style, label=mode, markersize=3)
        ax.axhline(1e3 * limit["limit_step_s"], color="grey", lw=0.8, label="one read of the weights")
        ax.set(xlabel="tokens in the pass", ylabel="ms per target forward", title=title)
        ax.legend()
    fig.suptitle(f"fp32 projections at measured widths ({cpu}, {args.threads} threads)")
    save_figure(fig, out / "bench_row_padding.png")
    print(f"wrote {out / 'bench_row_padding.json'} and {out / 'bench_row_padding.png'}")


if __name__ == "__main__":
    main()
