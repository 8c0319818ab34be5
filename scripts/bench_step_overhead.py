"""The engine's per-step overhead (issue 28): everything in a step that is not a model's forward pass.

A random 2-layer, 64-wide Llama target and a 1-layer draft over SmolLM2's tokenizer (49,152 tokens): the
models are cheap, so what the engine does around them — planning, step inputs, attention metadata, penalties,
logits → distributions, sampling, rejection sampling, stop strings, detokenization, KV bookkeeping — is most
of the step. Per batch size, method and settings, --batch sequences decode together (after their prefill)
and each measured step is split into
  step      the wall time of LLMEngine.step()
  passes    the forward passes as the decoder times them (StepTiming: each pass's runner call, which also
            builds its attention metadata and input tensors)
  model     the time inside the models' own forward and LM head (PagedCausalLM.forward_with_features and
            compute_logits, wrapped)
  overhead  step − model
Methods: "plain" (speculative=False), "ngram" (prompt lookup), "draft" (the draft model) and "eagle" (a random
EAGLE head on the same target, in a second engine: an engine loads a draft model or a head), the last three at a
fixed K = --k (random drafts are rarely accepted, so the planner would not draft; ngram drafts only where the
text repeats). The head's forward and LM head count as model time, as the draft's do. Settings: "greedy" (no penalties, no stop string), "penalties+stop" (a repetition and a frequency
penalty and a stop string that never matches), "sampled" (the same at temperature 0.8, top-p 0.95).
Goal (issue 28): overhead <= 1.5 ms per step at batch 1.

    taskset -c 1 python scripts/bench_step_overhead.py --label after --baseline bench_results/before/bench_step_overhead.json
    python scripts/bench_step_overhead.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_common import save_figure, subplots
from bench_common import cpu_name
from transformers import LlamaConfig, LlamaForCausalLM

from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.model.eagle_head import EagleConfig, EagleHead
from helix_serve.model.loader import load_model, load_tokenizer

STOP = "<|helix never stops here|>"
PENALTIES = dict(repetition_penalty=1.1, frequency_penalty=0.1, stop=[STOP])
SETTINGS = {"greedy": {}, "penalties+stop": PENALTIES, "sampled": dict(temperature=0.8, top_p=0.95, **PENALTIES)}
GOAL_MS = 1.5
BLOCK_SIZE = 16


def methods(k: int) -> dict[str, dict]:
    """Per method, its sampling parameters (the engine each runs on: `main`)."""
    return {"plain": dict(speculative=False), "ngram": dict(speculative_method="ngram", num_speculative_tokens=k),
            "draft": dict(speculative_method="draft", num_speculative_tokens=k),
            "eagle": dict(speculative_method="eagle", num_speculative_tokens=k)}


def make_model_dir(root: Path, name: str, tokenizer, layers: int, seed: int) -> Path:
    """A random 64-wide Llama over the tokenizer's vocabulary, saved as an HF checkpoint."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    path = root / name
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_head_dir(root: Path, target_dir: Path, seed: int) -> Path:
    """A randomly initialised EAGLE head for the target, over every other token id, saved as `helix distill` would."""
    target = load_model(str(target_dir), torch.device("cpu"), "float32")
    torch.manual_seed(seed)
    vocab = target.shape.vocab_size
    config = EagleConfig.for_target(target.hf_model.config, (0, 1), list(range(0, vocab, 2)))
    head = EagleHead(config, target.embed_tokens)
    head.init_from_target(target.lm_head.weight, target.norm.weight)
    head.save(root / "head")
    return root / "head"


class ModelClock:
    """Seconds spent inside the models' forward passes and LM heads (CPU: no device sync needed)."""

    def __init__(self, *models) -> None:
        self.seconds = 0.0
        for model in models:
            forward = "forward" if isinstance(model, EagleHead) else "forward_with_features"
            for name in (forward, "compute_logits"):
                setattr(model, name, self._timed(getattr(model, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            begin = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - begin
            return out
        return timed


def record_timings(engine: LLMEngine) -> list:
    """The StepTiming of every decoder step from now on (appended as the decoder returns it)."""
    timings: list = []
    step = engine.decoder.step

    def recorded(*args, **kwargs):
        out = step(*args, **kwargs)
        timings.append(out.timing)
        return out
    engine.decoder.step = recorded
    return timings


def run_case(engine: LLMEngine, clock: ModelClock, timings: list, batch: int, params: dict, args,
             seed: int) -> dict:
    """--batch sequences past their prefill, then --steps measured steps; per-step medians."""
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.pair.target.shape.vocab_size
    sampling = SamplingParams(max_tokens=(args.warmup + args.steps + 2) * (args.k + 1), ignore_eos=True, **params)
    for _ in range(batch):
        engine.add_request(torch.randint(3, vocab, (args.prompt_tokens,), generator=gen).tolist(), sampling)
    samples, drafted = [], 0
    for step in range(args.warmup + args.steps):
        clock.seconds, begin = 0.0, time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - begin
        assert all(not o.finished for o in outputs), "a sequence finished early (the stop string matched?)"
        if step >= args.warmup:
            assert len(outputs) == batch, "--warmup steps must admit the whole batch"
            timing = timings[-1]
            passes = timing.target.seconds + sum(p.seconds for p in timing.drafts + timing.heads)
            samples.append((1e3 * seconds, 1e3 * passes, 1e3 * clock.seconds))
            drafted += sum(o.num_drafted for o in outputs)
    for request_id in list(engine.seqs):
        engine.abort_request(request_id)
    step_ms, passes_ms, model_ms = (statistics.median(s[i] for s in samples) for i in range(3))
    return {"step_ms": step_ms, "passes_ms": passes_ms, "model_ms": model_ms,
            "overhead_ms": statistics.median(s - m for s, _, m in samples),
            "drafted_per_step": drafted / len(samples), "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--k", type=int, default=4, help="fixed draft tokens per step (ngram: where it finds some)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5, help="steps before measuring (the prefill among them)")
    parser.add_argument("--steps", type=int, default=60, help="measured steps per case")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1, help="1: a shared CPU stalls torch's thread barriers")
    parser.add_argument("--label", default="", help="a name for this run (e.g. before / after)")
    parser.add_argument("--baseline", help="an earlier run's bench_step_overhead.json, shown side by side")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 2, few steps")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.prompt_tokens, args.warmup, args.steps = [1, 2], 16, 3, 4
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        target = make_model_dir(Path(tmp), "target", tokenizer, layers=2, seed=0)
        draft = make_model_dir(Path(tmp), "draft", tokenizer, layers=1, seed=1)
        head = make_head_dir(Path(tmp), target, seed=2)
        longest = args.prompt_tokens + (args.warmup + args.steps + 2) * (args.k + 1)
        config = EngineConfig(target_model=str(target), draft_model=str(draft), device="cpu", dtype="float32",
                              block_size=BLOCK_SIZE, num_kv_blocks=max(args.batches) * (longest // BLOCK_SIZE + 2),
                              max_num_seqs=max(args.batches), draft_cost_ratio=0.1, verify_cost_ratio=0.1)
        engine = LLMEngine(config)
        with_head = LLMEngine(dataclasses.replace(config, draft_model=None, eagle_head=str(head)))
    runs = {}  # engine -> (its model clock, its step timings)
    for e in (engine, with_head):
        head_model = e.decoder.draft.head if e.decoder.eagle else None
        runs[e] = (ModelClock(*(m for m in (e.pair.target, e.pair.draft, head_model) if m is not None)),
                   record_timings(e))
    rows: dict = {}
    for batch in args.batches:
        for method, method_params in methods(args.k).items():
            runner = with_head if method == "eagle" else engine
            for setting in args.settings:
                case = run_case(runner, *runs[runner], batch, {**method_params, **SETTINGS[setting]}, args,
                                seed=len(rows))
                rows[f"{batch}/{method}/{setting}"] = {"batch": batch, "method": method, "setting": setting, **case}
    report(args, rows)


def report(args, rows: dict) -> None:
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    result = {"label": args.label, "args": vars(args), "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "goal_ms": GOAL_MS, "rows": rows}
    print(f"\n{args.label or 'run'}: {result['threads']} thread(s), {result['cpu']}, K = {args.k}")
    before = f" {'before':>8}" if baseline else ""
    print(f"{'batch':>5} {'method':6} {'settings':15} {'step':>7} {'passes':>7} {'model':>7} {'overhead':>8}{before}"
          f" {'drafted':>7}   (ms per step, medians)")
    for key, row in rows.items():
        old = baseline["rows"].get(key) if baseline else None
        before = f" {old['overhead_ms']:8.2f}" if old else (f" {'':8}" if baseline else "")
        print(f"{row['batch']:5} {row['method']:6} {row['setting']:15} {row['step_ms']:7.2f} {row['passes_ms']:7.2f} "
              f"{row['model_ms']:7.2f} {row['overhead_ms']:8.2f}{before} {row['drafted_per_step']:7.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_step_overhead.json").write_text(json.dumps(result, indent=2))
    plot(args, rows, baseline, out / "bench_step_overhead.png")
    print(f"wrote {out / 'bench_step_overhead.json'} and {out / 'bench_step_overhead.png'}")


def plot(args, rows: dict, baseline: dict | None, path: Path) -> None:
    fig, axes = subplots(1, len(args.batches), figsize=(5.5 * len(args.batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], args.batches):
        keys = [k for k, r in rows.items() if r["batch"] == batch]
        x = range(len(keys))
        runs = [(baseline["label"] or "baseline", baseline["rows"])] if baseline else []
        runs.append((args.label or "this run", rows))
        width = 0.8 / len(runs)
        for i, (label, run_rows) in enumerate(runs):
            values = [run_rows[k]["overhead_ms"] if k in run_rows else 0.0 for k in keys]
            ax.bar([j + (i - (len(runs) - 1) / 2) * width for j in x], values, width, label=label)
        if batch == 1:
            ax.axhline(GOAL_MS, color="black", linestyle="--", linewidth=1, label=f"goal {GOAL_MS} ms")
        ax.set_xticks(list(x))
        ax.set_xticklabels([k.split("/", 1)[1].replace("/", " ") for k in keys], fontsize=7, rotation=45,
                           ha="right")
        ax.set_yscale("log")  # sampled steps (a full top-p sort on a flat distribution) are 10-100x the rest
        ax.set_ylabel("overhead ms per step (step − forward passes)")
        ax.set_title(f"batch {batch}, K = {args.k}", fontsize=10)
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
