"""Pieces shared by the benchmark scripts (run them from the repo root: python scripts/NAME.py)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams

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


def measure_cost_ratio(engine: LLMEngine, context: int = 64, repeats: int = 30) -> dict:
    """c = one draft decode forward / one target decode forward, both with `context` cached tokens."""
    table: list[int] = []
    engine.block_manager.ensure_slots(table, context + 8)
    tokens = [int(t) % engine.pair.target.shape.vocab_size for t in range(1, context + 1)]
    runners = {"draft": engine.decoder.draft, "target": engine.decoder.target}
    times: dict[str, float] = {}
    for name, runner in runners.items():
        runner.logits([table], [tokens], [0], [1])  # prefill the context
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.logits([table], [tokens[-1:]], [context], [1])
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    verify = []
    for _ in range(repeats):  # a verify pass of 5 tokens (K = 4) costs about one decode pass on small models
        start = time.perf_counter()
        engine.decoder.target.logits([table], [tokens[-5:]], [context - 4], [5])
        verify.append(time.perf_counter() - start)
    engine.block_manager.release(table)
    return {"draft_step_s": times["draft"], "target_step_s": times["target"],
            "target_verify5_s": statistics.median(verify), "cost_ratio": times["draft"] / times["target"]}


def run_helix(engine: LLMEngine, prompt: str, max_tokens: int, **params) -> dict:
    [out] = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params))
    s = out.stats
    return {"seconds": s["time_seconds"], "tokens": s["tokens_generated"], "ttft": s["time_to_first_token"],
            "drafted": s["num_drafted"], "accepted": s["num_accepted"], "judged": s["num_judged"],
            "target_steps": s["num_target_steps"]}


def summarize(runs: list[dict]) -> dict:
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    row = {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds}
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
