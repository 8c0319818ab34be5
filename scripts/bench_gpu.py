"""Helix on a GPU, side by side with transformers: K=0 and speculative decoding at batch 1, K=0 at batch B, each
beside the bandwidth limit (weight bytes ÷ a one-row GEMM's measured bandwidth on the device).

Random-weight checkpoints of real shapes are made on the device (TinyLlama-1.1B and Llama-3-8B targets, a
llama-68m-shaped draft). Acceptance is CONTROLLED as in bench_scale.py: α is set, not measured. transformers'
assisted generation is not run: it cannot be given a controlled α, and a random draft's α is ~0.

    python scripts/bench_gpu.py                                   # both shapes, bf16, CUDA
    python scripts/bench_gpu.py --quick --device cpu --dtype float32   # small shapes (smoke test)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_common import bandwidth_limit, save_figure, subplots
from bench_scale import QUICK_SHAPES, SHAPES, ControlledDraftRunner, build_pair, timed

from helix_serve.config import EngineConfig
from helix_serve.device import synchronize
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams

TARGETS = {  # published configs: TinyLlama-1.1B, Llama-3-8B (vocabulary 128256)
    "tinyllama-1.1b": (SHAPES["target"], 32000),
    "llama-8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8), 128256),
}


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds for transformers' batched greedy `generate` (equal-length prompts: no padding)."""
    ids = torch.tensor(prompts, device=model.device)
    synchronize(model.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    synchronize(model.device)
    assert out.shape[1] == ids.shape[1] + max_tokens
    return time.perf_counter() - start


def measure(name: str, shapes: dict, vocab: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    pair = build_pair(shapes, dtype, device, vocab)
    engine = LLMEngine(EngineConfig(device=str(device), num_kv_blocks=args.batch * 16, max_num_seqs=args.batch,
                                    k_max=max(args.k, 8)), pair=pair)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
    n = args.max_tokens
    timed(engine, prompts[0], 8, speculative=False)  # warm-up
    hf_greedy(pair.target.hf_model, prompts[:1], 8)
    limit = bandwidth_limit(engine)
    base_s, base = timed(engine, prompts[0], n, speculative=False)
    real_draft = engine.decoder.draft
    engine.decoder.draft = ControlledDraftRunner(real_draft, args.alpha, prompts[0] + base.token_ids)
    spec_s, spec = timed(engine, prompts[0], n, num_speculative_tokens=args.k)
    engine.decoder.draft = real_draft
    hf1_s = hf_greedy(pair.target.hf_model, prompts[:1], n)
    start = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True, speculative=False))
    batch_s = time.perf_counter() - start
    hfb_s = hf_greedy(pair.target.hf_model, prompts, n)
    row = {"target": name, "vocab": vocab, **limit,
           "k0_step_ms": 1e3 * base_s / n, "k0_tokens_per_s": n / base_s,
           "k0_over_limit": base_s / n / limit["limit_step_s"],
           "spec_tokens_per_s": n / spec_s, "spec_step_ms": 1e3 * spec_s / spec.stats["num_target_steps"],
           "spec_speedup": base_s / spec_s, "spec_alpha_seen": spec.stats["alpha"],
           "spec_identical": spec.token_ids == base.token_ids,
           "hf_tokens_per_s": n / hf1_s, "helix_batch_tokens_per_s": args.batch * n / batch_s,
           "hf_batch_tokens_per_s": args.batch * n / hfb_s, "batch_over_hf": hfb_s / batch_s}
    del engine, pair, real_draft
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.quick:
        args.batch, args.max_tokens = min(args.batch, 4), min(args.max_tokens, 16)
    rows = []
    for name in args.targets:
        shapes, vocab = (QUICK_SHAPES["target"], 512) if args.quick else TARGETS[name]
        draft = QUICK_SHAPES["draft"] if args.quick else SHAPES["draft"]
        rows.append(measure(name, {"target": shapes, "draft": draft}, vocab, args, device, dtype))
        print(json.dumps(rows[-1]), flush=True)
    report(rows, args, device)


def report(rows: list[dict], args, device: torch.device) -> None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{where}, {args.dtype}, prompt {args.prompt_len} tokens, {args.max_tokens} new; speculative: CONTROLLED "
          f"α={args.alpha}, K={args.k}, llama-68m-shaped draft; batch {args.batch} at K=0")
    print(f"{'target':>15} {'limit ms':>8} {'K=0 ms':>7} {'÷limit':>6} {'K=0 t/s':>8} {'spec t/s':>8} {'×K=0':>5} "
          f"{'same':>5} {'HF t/s':>7} {f'B={args.batch} t/s':>9} {'HF B t/s':>8} {'×HF':>5}")
    for r in rows:
        print(f"{r['target']:>15} {r['limit_step_s'] * 1e3:8.2f} {r['k0_step_ms']:7.2f} {r['k0_over_limit']:6.2f} "
              f"{r['k0_tokens_per_s']:8.1f} {r['spec_tokens_per_s']:8.1f} {r['spec_speedup']:5.2f} "
              f"{str(r['spec_identical']):>5} {r['hf_tokens_per_s']:7.1f} {r['helix_batch_tokens_per_s']:9.1f} "
              f"{r['hf_batch_tokens_per_s']:8.1f} {r['batch_over_hf']:5.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps({"device": where, "args": vars(args), "rows": rows}, indent=2))
    fig, ax = subplots(figsize=(7, 4))
    names = [r["target"] for r in rows]
    for i, (key, label) in enumerate([("hf_tokens_per_s", "transformers, batch 1"), ("k0_tokens_per_s", "Helix K=0"),
                                      ("spec_tokens_per_s", f"Helix spec (α={args.alpha}, K={args.k})")]):
        ax.bar([j + 0.27 * (i - 1) for j in range(len(rows))], [r[key] for r in rows], 0.27, label=label)
    ax.set_xticks(range(len(rows)), names)
    ax.set(ylabel="tokens/s", title=f"batch 1 on {where}, {args.dtype}")
    ax.legend()
    save_figure(fig, out / "bench_gpu.png")
    print(f"wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.png'}")


if __name__ == "__main__":
    main()
