"""`helix distill`: answers → sub-vocabulary → draft → training → engine-measured acceptance → model card.

Every stage is resumable from what the output directory already holds (answers JSONL, training
checkpoint), so a run can span sessions with `--resume`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from helix_serve.distill.card import write_card
from helix_serve.distill.data import chat_prompt_ids, generate_responses
from helix_serve.distill.draft_model import build_draft, coverage, select_vocab, set_vocab
from helix_serve.distill.prompts import build_prompts, split_prompts
from helix_serve.distill.trainer import CHECKPOINT, TrainConfig, train_draft
from helix_serve.device import preferred_cpu_dtype
from helix_serve.model.loader import load_tokenizer
from helix_serve.model.sources import resolve_source
from helix_serve.model.vocab_map import VocabMap

logger = logging.getLogger(__name__)
ANSWERS = "answers.jsonl"
VOCAB = "draft_vocab.json"  # the sub-vocabulary, fixed once chosen: a resumed checkpoint's rows mean these ids
# Shares of --budget-minutes: answering (wall clock from the start), training (training time, summed over
# resumes, so a resumed run trains on where it stopped); the rest is kept for evaluating the draft.
DATA_SHARE, TRAIN_SHARE = 0.45, 0.45


@dataclass(slots=True)
class DistillArgs:
    target: str
    out: Path
    budget_minutes: float = 110.0
    resume: bool = False
    seed: int = 0
    num_layers: int = 2
    draft_vocab_size: int = 8192
    batch_size: int = 16
    threads: int = 2
    max_prompts: int | None = None  # use only the first N training and held-out prompts (quick runs)
    command: str = ""
    method: str = "draft"  # draft: an early-exit draft model; eagle: a head on the target's features (eagle_run.py)
    rounds: int = 4  # eagle: answer rounds (greedy, then sampled)
    max_answer_tokens: int = 192  # eagle: longest answer generated
    max_num_seqs: int = 32  # eagle: the answering engine's batch
    ttt_steps: int = 3  # eagle: training-time-test depth
    eval_max_tokens: int = 64  # eagle: tokens per held-out prompt in each evaluation run (12 runs: K 1-6 x 2)
    init_from: Path | None = None  # eagle: fine-tune this saved head (its layers, sub-vocabulary) instead of a new one


def _load_target(name: str, dtype: torch.dtype):
    source = resolve_source(name)
    return AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **source.model_kwargs).eval()


def distill(args: DistillArgs) -> dict:
    """Run the whole pipeline; returns the evaluation written into the model card."""
    if args.method == "eagle":
        from helix_serve.distill.eagle_run import distill_eagle

        return distill_eagle(args)
    if args.method != "draft":
        raise ValueError(f"unknown distill method {args.method!r}; expected draft or eagle")
    if args.init_from is not None:
        raise ValueError("--init-from fine-tunes an EAGLE head: use it with --method eagle")
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    budget_s = args.budget_minutes * 60
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.target)
    dtype = preferred_cpu_dtype()  # emulated bf16 is several times slower than fp32 (device.py)
    target = _load_target(args.target, dtype)
    train_prompts, held_out = split_prompts(build_prompts(args.seed))
    train_prompts, held_out = train_prompts[: args.max_prompts], held_out[: args.max_prompts]

    answers, vocab_path = args.out / ANSWERS, args.out / VOCAB
    if not args.resume:
        for stale in (answers, args.out / CHECKPOINT, args.out / "loss.jsonl", vocab_path):
            stale.unlink(missing_ok=True)
    full_vocab = target.config.vocab_size
    saved_vocab = json.loads(vocab_path.read_text()) if vocab_path.exists() else None
    vocab_size = len(saved_vocab) if saved_vocab else min(args.draft_vocab_size, full_vocab)
    # Built before answering: a target config the draft cannot take fails now, not after 45 % of the budget.
    draft = build_draft(target, args.num_layers, vocab_size)
    examples = generate_responses(target, tokenizer, train_prompts, answers, deadline=start + DATA_SHARE * budget_s)
    if not examples:
        raise ValueError("the answer budget ran out before the first batch: raise --budget-minutes")

    vocab_ids = saved_vocab or select_vocab(examples, tokenizer.all_special_ids, args.draft_vocab_size, full_vocab)
    vocab_path.write_text(json.dumps(vocab_ids))
    vocab = VocabMap(len(vocab_ids), full_vocab, vocab_ids, torch.device("cpu"))
    set_vocab(draft, target, vocab_ids)
    train_budget = TRAIN_SHARE * budget_s
    cfg = TrainConfig(batch_size=args.batch_size, seed=args.seed, autocast_bf16=dtype == torch.bfloat16)
    del target  # training uses the distributions stored with the answers
    state = train_draft(draft, vocab, examples, args.out, train_budget, tokenizer.pad_token_id or 0, cfg,
                        resume=args.resume)

    draft.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    evaluation = evaluate_draft(args.target, str(args.out), tokenizer, held_out)
    facts = {
        "args": {k: str(v) for k, v in asdict(args).items()},
        "num_examples": len(examples),
        "num_answer_tokens": sum(len(e.response_ids) for e in examples),
        "num_sampled_examples": sum(e.round > 0 for e in examples),
        "sub_vocab_coverage": coverage(examples, vocab_ids),
        "train": {"steps": state.step, "seconds": state.elapsed_s, "tokens": state.tokens, "last_loss": state.last_loss},
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "wall_seconds": time.monotonic() - start,
        **evaluation,
    }
    (args.out / "distill.json").write_text(json.dumps(facts, indent=2))
    write_card(args.out, facts)
    return facts


def evaluate_draft(target: str, draft: str, tokenizer, prompts: list[str], max_tokens: int = 128) -> dict:
    """α, acceptance and the cost ratios as Helix's own engine measures them on held-out chat prompts."""
    from helix_serve.config import EngineConfig  # the engine is only needed for this last stage
    from helix_serve.engine.llm_engine import LLMEngine
    from helix_serve.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(target_model=target, draft_model=draft, device="cpu", num_kv_blocks=2048))
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    result = {"num_eval_prompts": len(prompts), "eval_max_tokens": max_tokens, "dtype": str(engine.pair.target.dtype)}
    c, v = engine.cost_ratios
    result.update(draft_cost_ratio=c, verify_cost_ratio=v)
    samples = []
    for label, temperature in (("greedy", 0.0), ("t0.8", 0.8)):
        # The method fixed to the measured proposer: under "hybrid" prompt lookup's acceptances would count.
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=1, num_speculative_tokens=4,
                                speculative_method="draft")
        outs = engine.generate(ids, params)
        judged = sum(o.stats["num_judged"] for o in outs)
        accepted = sum(o.stats["num_accepted"] for o in outs)
        drafted = sum(o.stats["num_drafted"] for o in outs)
        steps = sum(o.stats["num_target_steps"] for o in outs)
        tokens = sum(o.stats["tokens_generated"] for o in outs)
        by_proposer: dict[str, dict[str, int]] = {}
        for o in outs:
            for name, counts in o.stats["by_proposer"].items():
                mine = by_proposer.setdefault(name, {"num_drafted": 0, "num_accepted": 0})
                mine["num_drafted"] += counts["num_drafted"]
                mine["num_accepted"] += counts["num_accepted"]
        result[label] = {"alpha": accepted / max(judged, 1), "acceptance_rate": accepted / max(drafted, 1),
                         "tokens_per_target_step": tokens / max(steps, 1), "by_proposer": by_proposer}
        samples = samples or [{"prompt": p, "answer": o.text} for p, o in zip(prompts[:3], outs[:3])]
    result["samples"] = samples
    return result
