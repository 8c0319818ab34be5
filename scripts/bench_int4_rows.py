"""The int4 kernel against the bf16 copies of `int4_dense_rows`, by pass width, on the target's own projections.

torch's CPU int4 kernel works through a pass's rows four at a time and is compute-bound past a few rows; a bf16
GEMM of the same weights streams them once (model/int4.py). This times every int4 projection of the target, in
the order a forward runs them, through both at each width (one after the other, best of `--repeats`), prints ms per
forward's worth of projections and per row, and the width `int4_dense_rows: auto` picks on this CPU.

    python scripts/bench_int4_rows.py --target smollm2-135m-instruct
    python scripts/bench_int4_rows.py --quick
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_common import DEFAULT_TARGET, cpu_name, save_figure, subplots
from tqdm import tqdm

from helix_serve.model.int4 import Int4Linear, choose_dense_rows, time_both_paths
from helix_serve.model.loader import load_model

WIDTHS = (1, 2, 4, 5, 8, 12, 16, 24, 32, 33, 48, 64, 128, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="widths 1, 4 and 16, one repeat")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    widths = (1, 4, 16) if args.quick else WIDTHS
    args.repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    # int4_dense_rows=1: keep every layer's copy, whatever `auto` would choose, so both paths can be timed
    model = load_model(args.target, torch.device("cpu"), "float32", "int4", int4_dense_rows=1)
    layers = [p for p in model.projections if isinstance(p, Int4Linear)]
    rows = []
    for width in tqdm(widths, desc="widths"):
        kernel, copy = time_both_paths(layers, width, args.repeats)
        rows.append({"rows": width, "kernel_ms": kernel * 1e3, "copy_ms": copy * 1e3})
    auto = choose_dense_rows(layers, repeats=args.repeats)
    print(f"{len(layers)} int4 projections of {args.target}; CPU: {cpu_name()}, {args.threads} threads")
    print(f"{'rows':>5} {'kernel ms':>10} {'copy ms':>8} {'kernel/row':>11} {'copy/row':>9}")
    for r in rows:
        print(f"{r['rows']:5d} {r['kernel_ms']:10.2f} {r['copy_ms']:8.2f} {r['kernel_ms'] / r['rows']:11.2f} "
              f"{r['copy_ms'] / r['rows']:9.2f}")
    print(f"int4_dense_rows: auto picks {auto} here (0: never)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"target": args.target, "cpu": cpu_name(), "threads": args.threads, "auto": auto}
    (out / "bench_int4_rows.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    fig, ax = subplots(1, 1)
    for key, label in (("kernel_ms", "int4 kernel"), ("copy_ms", "bf16 copy")):
        ax.plot([r["rows"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    if auto:
        ax.axvline(auto, color="grey", linestyle=":", label=f"auto: {auto} rows")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows in the pass")
    ax.set_ylabel("ms, all int4 projections of one forward")
    ax.set_title(f"int4 kernel vs bf16 copy\n{args.target}, {cpu_name()}, {args.threads} threads", fontsize=10)
    ax.legend()
    save_figure(fig, out / "bench_int4_rows.png")
    print(f"wrote {out / 'bench_int4_rows.json'} and {out / 'bench_int4_rows.png'}")


if __name__ == "__main__":
    main()
