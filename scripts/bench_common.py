"""Pieces shared by the benchmark scripts (run them from the repo root: python scripts/NAME.py)."""

from __future__ import annotations

import statistics
from pathlib import Path

from helix_serve.config import DEFAULT_DRAFT, DEFAULT_TARGET
from helix_serve.engine.calibration import measure_step_costs
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


def add_pair_args(parser) -> None:
    """The model pair and how it runs: the same flags in every engine benchmark."""
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")


def step_costs(engine: LLMEngine) -> dict:
    """The engine's start-up calibration (c, v) plus a fresh measurement after the runs."""
    costs = measure_step_costs(engine.decoder.target, engine.decoder.draft, engine.block_manager, repeats=15)
    return {"draft_step_s": costs.draft_decode_s, "target_step_s": costs.target_decode_s,
            "target_verify5_s": costs.target_verify_s, "cost_ratio": costs.draft_ratio,
            "verify_ratio": costs.verify_ratio}


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
