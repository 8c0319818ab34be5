"""Pieces shared by the benchmark scripts (run them from the repo root: python scripts/NAME.py)."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from helix_serve.config import DEFAULT_DRAFT, DEFAULT_TARGET, QUANTIZATIONS
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.engine.step_cost import calibrate
from helix_serve.model.int4 import Int4Linear

# Chat questions for an instruct model (none of them is in helix distill's prompt set).
CHAT_QUESTIONS = [
    "What is the capital of Japan?",
    "Explain how a rainbow forms.",
    "Give me three tips for learning to play the guitar.",
    "Write a short poem about the sunrise.",
    "What is the difference between a fruit and a vegetable?",
    "Write a Python function that checks whether a list is sorted.",
    "Why do cats purr?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]
# Continuations for the small Shakespeare pair, which has no chat template.
PROMPTS = [
    "ROMEO:\nBut soft, what light",
    "KING HENRY:\nOnce more unto the breach",
    "HAMLET:\nTo be, or not to be",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "JULIET:\nO Romeo, Romeo! wherefore art thou",
    "MACBETH:\nIs this a dagger which I see before me",
    "PORTIA:\nThe quality of mercy is not strain'd",
    "Enter a Messenger.\n\nMessenger:\n",
]


def cpu_name() -> str:
    """The CPU's model name, to print beside every figure (the machines here differ: Zen 3 or Zen 4)."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def add_pair_args(parser, quantization: bool = True) -> None:
    """The model pair and how it runs: the same flags in every engine benchmark."""
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on CPUs with native bf16, else float32")
    parser.add_argument("--device", default="cpu")
    if quantization:  # none by default: Helix rows then share transformers' numerics (the app's default is auto)
        parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none")


def bench_prompts(engine: LLMEngine) -> list[list[int] | str]:
    """Chat-templated questions (token ids) for a model with a chat template, else the Shakespeare prompts."""
    tokenizer = engine.tokenizer
    if not tokenizer.chat_template:
        return PROMPTS
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for q in CHAT_QUESTIONS]


def gemv_bandwidth(dtype: torch.dtype, repeats: int = 15, device: torch.device | str = "cpu") -> float:
    """Bytes/s that a one-row GEMM streams from a weight larger than any cache, measured now: 128 MiB-class on a
    CPU, 1 GiB on a GPU (an H200's L2 holds 60 MB), timed with device events there."""
    device = torch.device(device)
    rows, cols = (8192, 4096) if device.type == "cpu" else (32768, 16384)
    weight = torch.randn(rows, cols, device=device).to(dtype)
    x = torch.randn(1, cols, device=device).to(dtype)
    torch.nn.functional.linear(x, weight)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.nn.functional.linear(x, weight)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            samples.append(time.perf_counter() - start)
    return weight.numel() * weight.element_size() / statistics.median(samples)


def weight_bytes_per_forward(model) -> int:
    """Bytes of weights a decode forward reads: every parameter once, except an untied input embedding
    (a lookup reads a few rows); int4 projections at their packed size (codes, scales and zero points)."""
    hf = model.hf_model
    params = {id(p): p for p in hf.parameters()}
    embed = hf.get_input_embeddings().weight
    if embed is not hf.get_output_embeddings().weight:
        params.pop(id(embed), None)
    total = sum(p.numel() * p.element_size() for p in params.values())
    for layer in model.projections:
        if isinstance(layer, Int4Linear):  # its fp32 weight (a view in `params`) is not read; its 4-bit copy is
            total += layer.packed_weight.nbytes + layer.scales_and_zeros.nbytes
            total -= layer.in_features * layer.out_features * model.dtype.itemsize
    return total


def bandwidth_limit(engine: LLMEngine) -> dict:
    """The physical limit of one target forward at batch 1: weight bytes ÷ measured GEMV bandwidth."""
    model = engine.pair.target
    bandwidth = gemv_bandwidth(model.dtype, device=model.device)
    nbytes = weight_bytes_per_forward(model)
    return {"weight_bytes": nbytes, "gemv_bytes_per_s": bandwidth, "limit_step_s": nbytes / bandwidth}


def step_costs(engine: LLMEngine) -> dict:
    """Step costs measured afresh after the runs (the engine's calibration, 15 repeats per point, 1–8 tokens)."""
    costs = calibrate(engine.decoder.target, engine.decoder.draft, engine.block_manager, max_tokens=8, max_rows=1,
                      long_context=64, repeats=15)
    c, v = costs.ratios
    return {"draft_step_s": costs.draft(1) if costs.draft else None, "target_step_s": costs.target(1),
            "target_verify5_s": costs.target(5), "cost_ratio": c, "verify_ratio": v}


def run_helix(engine: LLMEngine, prompt: str, max_tokens: int, **params) -> dict:
    [out] = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params))
    s = out.stats
    return {"seconds": s["time_seconds"], "tokens": s["tokens_generated"], "ttft": s["time_to_first_token"],
            "drafted": s["num_drafted"], "accepted": s["num_accepted"], "judged": s["num_judged"],
            "target_steps": s["num_target_steps"]}


def summarize(runs: list[dict], limit_step_s: float | None = None) -> dict:
    """Totals of one method's runs; with `limit_step_s`, the bandwidth-limit ratio of its target steps
    (limit ÷ measured time per target forward; HF greedy does one forward per token)."""
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    row = {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds}
    steps = sum(r.get("target_steps", r["tokens"]) for r in runs)
    row["step_ms"] = 1000 * seconds / steps
    if limit_step_s is not None:
        row["bandwidth_limit_ratio"] = limit_step_s * steps / seconds
    ttfts = [r["ttft"] for r in runs if r["ttft"] is not None]
    row["ttft_ms_median"] = 1000 * statistics.median(ttfts) if ttfts else None
    drafted = sum(r.get("drafted", 0) for r in runs)
    if drafted:
        row["acceptance_rate"] = sum(r["accepted"] for r in runs) / drafted
        row["alpha"] = sum(r["accepted"] for r in runs) / sum(r["judged"] for r in runs)
        row["mean_accepted_length"] = tokens / sum(r["target_steps"] for r in runs)
    return row


def subplots(*args, **kwargs):
    """matplotlib figure on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
