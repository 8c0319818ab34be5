"""The last stage of `helix distill --method eagle`: the head's acceptance as Helix's own engine measures it.

The engine loads the target and the new head (no draft model) with `speculative_method` fixed to "eagle", so
prompt lookup's acceptances cannot count, and each run fixes K: for K = 1 … 6, greedy and sampled at T = 0.8,
on held-out prompts. c is the engine's calibrated cost of one head pass over one target forward (batch 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from helix_serve.model.loader import ModelPair

EVAL_KS = (1, 2, 3, 4, 5, 6)
SAMPLINGS = (("greedy", 0.0), ("t0.8", 0.8))
EVAL_SEED = 1


def evaluate_eagle(target: str, head_dir: Path, prompt_ids: list[list[int]], max_tokens: int,
                   pair: ModelPair | None = None) -> dict:
    """α, acceptance and accepted tokens per step at each K and sampling, and the head's cost ratio. `pair`:
    the target already loaded (its draft, if any, is not used)."""
    from helix_serve.config import EngineConfig  # the engine is only needed for this last stage
    from helix_serve.engine.llm_engine import LLMEngine
    from helix_serve.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(target_model=target, draft_model=None, eagle_head=str(head_dir), device="cpu",
                                    num_kv_blocks=2048, speculative_method="eagle"), pair)
    c, v = engine.cost_ratios
    result: dict = {"num_eval_prompts": len(prompt_ids), "eval_max_tokens": max_tokens, "ks": list(EVAL_KS),
                    "dtype": str(engine.pair.target.dtype),
                    "quantization": engine.pair.target.quantization, "eagle_cost_ratio": c, "verify_cost_ratio": v,
                    "speculative_method": "eagle"}
    for label, temperature in SAMPLINGS:
        result[label] = {str(k): _measure(engine, prompt_ids, SamplingParams(
            max_tokens=max_tokens, temperature=temperature, seed=EVAL_SEED, num_speculative_tokens=k,
            speculative_method="eagle")) for k in EVAL_KS}
    return result


def _measure(engine, prompt_ids: list[list[int]], params) -> dict:
    """Run every prompt to the end; count per drafting step (each output that verified drafts is one)."""
    for ids in prompt_ids:
        engine.add_request(ids, params)
    steps = accepted_per_step = 0
    finals: list[dict] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.num_drafted:
                steps += 1
                accepted_per_step += out.num_accepted
            if out.finished:
                finals.append(out.stats)
    total = {key: sum(s[key] for s in finals) for key in
             ("num_judged", "num_accepted", "num_drafted", "num_target_steps", "tokens_generated")}
    proposers = sorted({name for s in finals for name in s["by_proposer"]})
    return {"alpha": total["num_accepted"] / max(total["num_judged"], 1),
            "acceptance_rate": total["num_accepted"] / max(total["num_drafted"], 1),
            "accepted_per_step": accepted_per_step / max(steps, 1),
            "tokens_per_target_step": total["tokens_generated"] / max(total["num_target_steps"], 1),
            "num_drafting_steps": steps, "proposers": proposers}
