"""Helix beside llama.cpp on the same GGUF, the same token ids and the same threads, in one run.

Rows (greedy): batch-1 decode only (a `llama-bench tg`-like rate: tokens after the first ÷ time after the first),
batch-1 chat end to end (prefill included, natural stops), batch-1 copy-heavy prompts, and N concurrent requests
(llama.cpp decoding them as one batch per step, as `llama-server -np N` does). Each row prints Helix ÷ llama.cpp and
the batch-1 bandwidth limit (the GGUF's bytes ÷ measured memory bandwidth). llama.cpp comes from llama-cpp-python,
built from PyPI's source distribution (`pip install -e .[llamacpp]`, ~10 min on 2 cores; never in CI):

    python scripts/bench_llamacpp.py                 # ~10 min on 2 cores: 2 rounds
    python scripts/bench_llamacpp.py --quick         # smoke
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from bench_common import CHAT_QUESTIONS, cpu_name, gemv_bandwidth, save_figure, subplots
from bench_planner import GROUNDED
from tqdm import tqdm

from helix_serve.config import EngineConfig
from helix_serve.device import cpu_has_native_bf16
from helix_serve.distill.data import chat_prompt_ids
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.model.sources import SMOLLM2_ALIAS, smollm2_gguf_path


@dataclass(slots=True)
class Run:
    """One request's result: tokens, wall seconds from submission to the last token, seconds to the first."""

    tokens: int
    seconds: float
    ttft: float
    token_ids: list[int] = field(default_factory=list)


class LlamaCpp:
    """Greedy generation through llama.cpp's C API (llama-cpp-python's bindings): every live sequence decodes one
    token per `llama_decode` call, prompts are prefilled in batches of up to `n_batch` tokens."""

    def __init__(self, gguf: Path, threads: int, max_seqs: int, ctx_per_seq: int = 1024, n_batch: int = 512):
        import llama_cpp as lc

        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        lc.llama_log_set(self._quiet, ctypes.c_void_p())
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), model_params)
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = ctx_per_seq * max_seqs, n_batch, n_batch
        params.n_seq_max, params.n_threads, params.n_threads_batch = max_seqs, threads, threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_batch, self.max_seqs = n_batch, max_seqs
        self.batch = lc.llama_batch_init(n_batch, 0, max_seqs)

    def system_info(self) -> str:
        return self.lc.llama_print_system_info().decode()

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, index: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], max_tokens: int, ignore_eos: bool) -> list[Run]:
        assert len(prompts) <= self.max_seqs
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        outputs: list[list[int]] = [[] for _ in prompts]
        first: list[float] = [0.0] * len(prompts)
        done: list[float | None] = [None] * len(prompts)
        # Prefill: prompts packed into batches of n_batch tokens; each prompt's last token gives its first output.
        pending = [(tok, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
        for lo in range(0, len(pending), self.n_batch):
            chunk = pending[lo: lo + self.n_batch]
            self._decode(chunk)
            for i, (_, _, seq, last) in enumerate(chunk):
                if last:
                    outputs[seq].append(self._argmax(i))
                    first[seq] = time.perf_counter() - start
        eos = {self.lc.llama_vocab_eos(self.vocab), self.lc.llama_vocab_eot(self.vocab)}
        for seq, out in enumerate(outputs):
            if len(out) >= max_tokens or (not ignore_eos and out[-1] in eos):
                done[seq] = first[seq]
        while (live := [s for s in range(len(prompts)) if done[s] is None]):
            self._decode([(outputs[s][-1], len(prompts[s]) + len(outputs[s]) - 1, s, True) for s in live])
            now = time.perf_counter() - start
            for i, s in enumerate(live):
                token = self._argmax(i)
                outputs[s].append(token)
                if len(outputs[s]) >= max_tokens or (not ignore_eos and token in eos):
                    done[s] = now
        return [Run(len(o), d, f, o) for o, d, f in zip(outputs, done, first)]


def helix_generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, ignore_eos: bool,
                   speculative: bool) -> list[Run]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, speculative=speculative)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    # All submitted together: each request's time is its own (stats), measured from the common start for batches.
    if len(prompts) > 1:
        wall = time.perf_counter() - start
        return [Run(len(o.token_ids), wall, o.stats["time_to_first_token"], o.token_ids) for o in outs]
    return [Run(len(o.token_ids), o.stats["time_seconds"], o.stats["time_to_first_token"], o.token_ids)
            for o in outs]


def decode_rate(runs: list[Run]) -> float:
    """Tokens after the first ÷ time after the first (prefill excluded), over the runs."""
    return sum(r.tokens - 1 for r in runs) / sum(r.seconds - r.ttft for r in runs)


def e2e_rate(runs: list[Run]) -> float:
    return sum(r.tokens for r in runs) / sum(r.seconds for r in runs)


def aggregate_rate(runs: list[Run]) -> float:
    """N requests submitted together: all their tokens ÷ the time until the last one finished."""
    return sum(r.tokens for r in runs) / max(r.seconds for r in runs)


def scenarios(args, chat: list[list[int]], copy: list[list[int]]) -> dict[str, tuple]:
    """name → (prompts, each run's prompts, max_tokens, ignore_eos, rate function)."""
    batch = [chat[i % len(chat)] for i in range(args.concurrency)]
    return {
        "decode, batch 1": (chat, "one", args.max_tokens, True, decode_rate),
        "chat, batch 1, e2e": (chat, "one", args.max_tokens, False, e2e_rate),
        "copy-heavy, batch 1, e2e": (copy, "one", args.max_tokens, False, e2e_rate),
        f"{args.concurrency} concurrent, {args.batch_tokens} tokens": (batch, "all", args.batch_tokens, True,
                                                                       aggregate_rate),
    }


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf_path()
    # "Helix default" is what `serve run serve_config.yaml` serves: hybrid over the shipped EAGLE head and prompt
    # lookup (--proposer draft: the distilled draft model instead).
    proposer = {"draft_model": None, "eagle_head": "smollm2-eagle"} if args.proposer == "eagle" else {}
    engine = LLMEngine(EngineConfig(target_model=SMOLLM2_ALIAS, device="cpu", dtype=args.dtype,
                                    quantization=args.quantization, **proposer))
    tok = engine.tokenizer
    chat = [chat_prompt_ids(tok, q) for q in CHAT_QUESTIONS[: args.prompts]]
    copy = [chat_prompt_ids(tok, q) for q in GROUNDED[: args.prompts]]
    llama = LlamaCpp(gguf, args.threads, max(args.concurrency, 1))
    systems = {"llama.cpp": lambda p, n, e: llama.generate(p, n, e),
               "Helix K=0": lambda p, n, e: helix_generate(engine, p, n, e, False),
               "Helix default": lambda p, n, e: helix_generate(engine, p, n, e, True)}
    for generate in systems.values():  # warm-up: first-call allocations and weight repacking are not measured
        generate(chat[:1], 4, True)
        generate(chat[:2], 4, True)
    rows: dict[str, dict[str, list[float]]] = {}
    greedy_same: dict[str, list[bool]] = {}
    plan = scenarios(args, chat, copy)
    total = args.rounds * len(plan) * len(systems)
    with tqdm(total=total, desc="llama.cpp vs Helix") as bar:
        for round_ in range(args.rounds):
            for name, (prompts, mode, max_tokens, ignore_eos, rate) in plan.items():
                order = list(systems)[round_ % 3:] + list(systems)[: round_ % 3]  # rotate: noise hits all alike
                outputs = {}
                for system in order:
                    if mode == "one":
                        runs = [r for p in prompts for r in systems[system]([p], max_tokens, ignore_eos)]
                    else:
                        runs = systems[system](prompts, max_tokens, ignore_eos)
                    rows.setdefault(name, {}).setdefault(system, []).append(rate(runs))
                    outputs[system] = [r.token_ids for r in runs]
                    bar.update()
                # Exactness: Helix's speculation must reproduce Helix K=0 token for token (same target).
                greedy_same.setdefault(name, []).append(outputs["Helix default"] == outputs["Helix K=0"])
    bandwidth = gemv_bandwidth(torch.float32)
    weight_bytes = gguf.stat().st_size
    return {
        "cpu": cpu_name(), "cpu_native_bf16": cpu_has_native_bf16(), "threads": args.threads,
        "torch": torch.__version__, "gguf": gguf.name,
        "helix_dtype": str(engine.pair.target.dtype), "helix_quantization": engine.pair.target.quantization,
        "helix_lm_head": engine.pair.target.lm_head_format, "helix_proposers": engine.proposers,
        "llama_cpp_system_info": llama.system_info(), "rounds": args.rounds,
        "bandwidth_bytes_per_s": bandwidth, "gguf_bytes": weight_bytes,
        "batch1_limit_tokens_per_s": bandwidth / weight_bytes,
        "rows": {name: {system: {"tokens_per_s": statistics.median(v), "samples": v} for system, v in by.items()}
                 for name, by in rows.items()},
        "speculation_identical_to_k0": greedy_same,
    }


def report(result: dict, out: Path) -> None:
    bf16 = "native bf16" if result["cpu_native_bf16"] else "no native bf16"
    print(f"\n{result['cpu']} ({bf16}), {result['threads']} threads; {result['gguf']}; Helix {result['helix_dtype']} "
          f"quantization {result['helix_quantization']} (LM head {result['helix_lm_head']}), default's proposers "
          f"{result['helix_proposers']}; median of {result['rounds']} rounds")
    print(f"batch-1 bandwidth limit: {result['gguf_bytes'] / 1e6:.0f} MB ÷ {result['bandwidth_bytes_per_s'] / 1e9:.1f}"
          f" GB/s = {result['batch1_limit_tokens_per_s']:.0f} tokens/s")
    header = f"{'row':<30} {'llama.cpp':>10} {'Helix K=0':>10} {'Helix default':>14} {'K=0 ÷ l.cpp':>12} " \
             f"{'default ÷ l.cpp':>16}"
    print(header)
    print("-" * len(header))
    for name, by in result["rows"].items():
        base = by["llama.cpp"]["tokens_per_s"]
        k0, spec = by["Helix K=0"]["tokens_per_s"], by["Helix default"]["tokens_per_s"]
        print(f"{name:<30} {base:>10.1f} {k0:>10.1f} {spec:>14.1f} {k0 / base:>11.2f}× {spec / base:>15.2f}×")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_llamacpp.json").write_text(json.dumps(result, indent=2))
    fig, ax = subplots(figsize=(9, 4.5))
    names = list(result["rows"])
    width = 0.27
    for i, system in enumerate(("llama.cpp", "Helix K=0", "Helix default")):
        values = [result["rows"][n][system]["tokens_per_s"] for n in names]
        ax.bar(np.arange(len(names)) + (i - 1) * width, values, width, label=system)
    ax.axhline(result["batch1_limit_tokens_per_s"], color="grey", linestyle=":", label="batch-1 bandwidth limit")
    ax.set_xticks(np.arange(len(names)), names, fontsize=8)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Helix vs llama.cpp, same GGUF — {result['cpu']}, {result['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, out / "bench_llamacpp.png")
    print(f"wrote {out / 'bench_llamacpp.json'} and {out / 'bench_llamacpp.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--proposer", choices=["eagle", "draft"], default="eagle",
                        help="Helix default's model proposer: the shipped EAGLE head (served default) or the draft")
    parser.add_argument("--quantization", default="auto", help="Helix's; auto: int4 for this Q4_1 file on a CPU")
    parser.add_argument("--prompts", type=int, default=6, help="chat and copy-heavy prompts per batch-1 row")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 prompts, 16 tokens, 4 concurrent, 1 round")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.max_tokens, args.concurrency, args.batch_tokens, args.rounds = 2, 16, 4, 16, 1
    report(measure(args), Path(args.out))


if __name__ == "__main__":
    main()
