"""Engine step time vs history length (issue 31): does the per-step work grow with the tokens so far?

A random 2-layer, 64-wide Llama with SmolLM2's tokenizer (49,152 tokens): the model is cheap, so whatever
the engine redoes over the whole history each step (penalty counts, detokenization, stop strings, prompt
lookup, prefix-cache registration) shows in the step time. Per history length H, one engine (all sharing
the weights) runs --batch sequences that start with H tokens: a 100-token prompt plus H - 100 random
tokens appended as output before admission (the engine prefills one sequence per warm-up step, then
decodes and detokenizes those tokens as its own). Every sequence has a repetition and a frequency penalty
and a stop string that never matches. Rows: "plain" decodes at K = 0; "ngram" lets prompt lookup propose
every step.

The engines step in turn (one step each, round-robin), so load from other processes hits every H alike;
step time is the median over --steps steps after --warmup ones, and the ratio is to the first H. The time
inside paged attention (gathering each sequence's K/V through its block table, then attending over it) is
timed too: that is the model's own O(context) work; "other" = step - attention is the engine's.
Goal (issue 31): step time at 6,000 tokens of history <= 1.2x the step time at 300.

    python scripts/bench_history.py --label after --baseline bench_results/before/bench_history.json
    python scripts/bench_history.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_common import cpu_name, save_figure, subplots
from transformers import LlamaConfig, LlamaForCausalLM

import helix_serve.model.paged_llm as paged_llm
from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.model.loader import load_tokenizer

STOP = "<|helix never stops here|>"
METHODS = {"plain": dict(speculative=False), "ngram": dict(speculative_method="ngram")}
BLOCK_SIZE = 16


def make_model_dir(root: Path, tokenizer_name: str, context: int) -> Path:
    """A random 2-layer, 64-wide Llama over the tokenizer's vocabulary, saved as an HF checkpoint."""
    tokenizer = load_tokenizer(tokenizer_name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    path = root / "history-model"
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def growth(args) -> int:
    """The most tokens a sequence can gain while measured (K + 1 per step at most)."""
    return (args.warmup + args.steps) * (EngineConfig().k_max + 1)


def make_engines(model: Path, histories: list[int], args) -> dict[int, LLMEngine]:
    """One engine per history length, sharing the loaded weights (each has its own KV pool)."""
    engines: dict[int, LLMEngine] = {}
    for h in histories:
        blocks = args.batch * ((args.prompt_tokens + h + growth(args)) // BLOCK_SIZE + 2)
        config = EngineConfig(target_model=str(model), draft_model=None, device="cpu", dtype="float32",
                              block_size=BLOCK_SIZE, num_kv_blocks=blocks, max_num_seqs=args.batch,
                              max_num_batched_tokens=h + 256, draft_cost_ratio=0.0, verify_cost_ratio=0.1)
        first = next(iter(engines.values()), None)
        engines[h] = LLMEngine(config, pair=first.pair if first else None)
    return engines


def start(engine: LLMEngine, history: int, args, method: dict, seed: int) -> None:
    """--batch sequences of `history` tokens: a random prompt, then random tokens as if generated already."""
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.pair.target.shape.vocab_size
    params = SamplingParams(max_tokens=history + growth(args), ignore_eos=True,
                            repetition_penalty=1.1, frequency_penalty=0.1, stop=[STOP], **method)
    for _ in range(args.batch):
        prompt = torch.randint(3, vocab, (args.prompt_tokens,), generator=gen).tolist()
        seq = engine.seqs[engine.add_request(prompt, params)]
        seq.token_ids += torch.randint(3, vocab, (history - args.prompt_tokens,), generator=gen).tolist()


class AttentionClock:
    """Seconds spent in paged attention (wraps the function the model calls; CPU: no device sync needed)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._attention = paged_llm.paged_attention
        paged_llm.paged_attention = self._timed

    def _timed(self, *args, **kwargs):
        begin = time.perf_counter()
        out = self._attention(*args, **kwargs)
        self.seconds += time.perf_counter() - begin
        return out


def run_method(engines: dict[int, LLMEngine], args, method: dict, seed: int,
               clock: AttentionClock) -> dict[int, list[tuple[float, float]]]:
    """Step every engine in turn; (step ms, attention ms) of each engine's measured steps."""
    for i, (h, engine) in enumerate(engines.items()):
        start(engine, h, args, method, seed=seed + i)  # fresh tokens: nothing to reuse from the prefix cache
    times: dict[int, list[tuple[float, float]]] = {h: [] for h in engines}
    for step in range(args.warmup + args.steps):
        for h, engine in engines.items():
            if step == args.warmup:
                assert len(engine.scheduler.running) == args.batch, "--warmup steps must admit the whole batch"
            clock.seconds, begin = 0.0, time.perf_counter()
            outputs = engine.step()
            if step >= args.warmup:
                times[h].append((1e3 * (time.perf_counter() - begin), 1e3 * clock.seconds))
            assert all(not o.finished for o in outputs), "a sequence finished early (the stop string matched?)"
    for engine in engines.values():
        for request_id in list(engine.seqs):
            engine.abort_request(request_id)
    return times


def summarize(times: dict[int, list[tuple[float, float]]], first: int) -> dict:
    """Medians per history, and their ratios to the first history's."""
    row: dict = {"step_ms": {}, "attention_ms": {}, "other_ms": {}}
    for h, samples in times.items():
        row["step_ms"][h] = statistics.median(ms for ms, _ in samples)
        row["attention_ms"][h] = statistics.median(a for _, a in samples)
        row["other_ms"][h] = statistics.median(ms - a for ms, a in samples)
    for key in ("step", "other"):
        row[f"{key}_ratio"] = {h: ms / row[f"{key}_ms"][first] for h, ms in row[f"{key}_ms"].items()}
    row["samples"] = times
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--histories", type=int, nargs="+", default=[300, 1000, 3000, 6000])
    parser.add_argument("--batch", type=int, default=4, help="sequences per engine")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=8, help="steps per engine before measuring (prefill among them)")
    parser.add_argument("--steps", type=int, default=80, help="measured steps per engine")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="1: a shared CPU stalls torch's thread barriers")
    parser.add_argument("--label", default="", help="a name for this run (e.g. before / after)")
    parser.add_argument("--baseline", help="an earlier run's bench_history.json, shown side by side")
    parser.add_argument("--quick", action="store_true", help="histories 96 and 192, batch 2, few steps")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.histories, args.batch, args.prompt_tokens, args.warmup, args.steps = [96, 192], 2, 32, 3, 6
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model_dir(Path(tmp), args.tokenizer, max(args.histories) + growth(args) + 64)
        engines = make_engines(model, args.histories, args)
    clock = AttentionClock()
    rows = {name: summarize(run_method(engines, args, METHODS[name], 100 * m, clock), args.histories[0])
            for m, name in enumerate(args.methods)}
    report(args, rows)


def report(args, rows: dict) -> None:
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    result = {"label": args.label, "args": vars(args), "cpu": cpu_name(), "torch": torch.__version__, "rows": rows}
    print(f"\n{args.label or 'run'}: batch {args.batch}, {torch.get_num_threads()} threads, {result['cpu']}")
    print("step ms (ratio to the first history); attention ms; step - attention ms (ratio)")
    print(f"{'method':20} " + " ".join(f"{h:>31}" for h in args.histories))
    for name, row in rows.items():
        if baseline and name in baseline["rows"]:
            print_row(f"{name} ({baseline['label'] or 'baseline'})", baseline["rows"][name], args.histories)
        print_row(f"{name} ({args.label or 'this run'})", row, args.histories)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_history.json").write_text(json.dumps(result, indent=2))
    plot(args, rows, baseline, out / "bench_history.png")
    print(f"wrote {out / 'bench_history.json'} and {out / 'bench_history.png'}")


def print_row(name: str, row: dict, histories: list[int]) -> None:
    keys = ("step_ms", "step_ratio", "attention_ms", "other_ms", "other_ratio")
    ms, ratio, attention, other, other_ratio = ({int(h): v for h, v in row[k].items()} for k in keys)  # JSON: text keys
    print(f"{name:20} " + " ".join(f"{ms[h]:6.1f} ({ratio[h]:.2f}x) {attention[h]:5.1f} {other[h]:5.1f} "
                                   f"({other_ratio[h]:.2f}x)" for h in histories))


def plot(args, rows: dict, baseline: dict | None, path: Path) -> None:
    fig, axes = subplots(1, 2, figsize=(11, 4))
    runs = [(args.label or "this run", rows, "-")]
    if baseline:
        runs.insert(0, (baseline["label"] or "baseline", baseline["rows"], "--"))
    for ax, key, title in zip(axes, ("step_ms", "other_ms"), ("engine step", "engine step - paged attention")):
        for label, run_rows, style in runs:
            for name, row in run_rows.items():
                ms = {int(h): v for h, v in row[key].items()}
                ax.plot(list(ms), list(ms.values()), style, marker="o", label=f"{name}, {label}")
        ax.set_xlabel("history (tokens per sequence)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{title}: batch {args.batch}, penalties + a stop string", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
