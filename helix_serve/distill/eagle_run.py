"""`helix distill --method eagle`: engine answers → target features → sub-vocabulary → EAGLE head → the
engine's acceptance with it (eagle_eval.py) → card.

Every stage resumes from what the output directory holds (answers JSONL, feature chunks, the fixed
sub-vocabulary, the training checkpoint), so a run can span sessions with `--resume`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from helix_serve.distill.card import write_eagle_card
from helix_serve.distill.data import chat_prompt_ids
from helix_serve.distill.draft_model import coverage, select_vocab
from helix_serve.distill.eagle_data import extract_features, generate_answers, load_sequences
from helix_serve.distill.eagle_eval import evaluate_eagle
from helix_serve.distill.eagle_trainer import CHECKPOINT, LOSS_LOG, EagleTrainConfig, train_eagle
from helix_serve.distill.prompts import build_prompts, split_prompts
from helix_serve.model.eagle_head import EagleConfig, EagleHead, is_eagle_head

logger = logging.getLogger(__name__)
ANSWERS = "answers.jsonl"
VOCAB = "eagle_vocab.json"  # the sub-vocabulary, fixed once chosen: a resumed checkpoint's rows mean these ids
FEATURES = "features"
# Shares of --budget-minutes from the start (wall clock): answering ends at DATA_SHARE, features at
# FEATURE_SHARE; training gets TRAIN_SHARE of training time (summed over resumes).
DATA_SHARE, FEATURE_SHARE, TRAIN_SHARE = 0.35, 0.5, 0.45


def default_capture_layers(num_layers: int) -> tuple[int, ...]:
    """Low, middle and high residual streams, as EAGLE-3 picks them (vLLM: 2, L // 2, L - 3)."""
    return tuple(sorted({min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0)})) \
        if num_layers >= 3 else tuple(range(num_layers))


def _engine(target: str, max_num_seqs: int):
    from helix_serve.config import EngineConfig
    from helix_serve.engine.llm_engine import LLMEngine

    # Ratios given: no start-up calibration (plain decoding only, the planner never runs a proposer).
    return LLMEngine(EngineConfig(target_model=target, draft_model=None, device="cpu", max_num_seqs=max_num_seqs,
                                  num_kv_blocks=2048, draft_cost_ratio=0.3, verify_cost_ratio=0.0))


def distill_eagle(args) -> dict:
    """Run the whole pipeline for `args` (run.DistillArgs); returns the facts written into the card."""
    if args.init_from is not None and not is_eagle_head(args.init_from):
        raise ValueError(f"--init-from {args.init_from}: not an EAGLE head directory (helix distill --method eagle)")
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    budget_s = args.budget_minutes * 60
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        for stale in (out / ANSWERS, out / CHECKPOINT, out / LOSS_LOG, out / VOCAB):
            stale.unlink(missing_ok=True)
        for chunk in (out / FEATURES).glob("chunk_*"):
            chunk.unlink()
    engine = _engine(args.target, args.max_num_seqs)
    target = engine.pair.target
    # Fine-tuning an existing head keeps its captured layers and sub-vocabulary (its rows mean those ids).
    head = _init_head(args.init_from, target) if args.init_from else None
    train_prompts, held_out = split_prompts(build_prompts(args.seed))
    train_prompts = train_prompts[: args.max_prompts]
    answers = generate_answers(engine, train_prompts, out / ANSWERS, start + DATA_SHARE * budget_s,
                               args.rounds, args.max_answer_tokens)
    if not answers:
        raise ValueError("the answer budget ran out before the first answer: raise --budget-minutes")
    capture = head.config.capture_layers if head else default_capture_layers(target.shape.num_layers)
    paths = extract_features(target, answers, capture, out / FEATURES, start + FEATURE_SHARE * budget_s)
    seqs = load_sequences(paths)

    vocab_ids = _vocab(out / VOCAB, answers, engine.tokenizer.all_special_ids, args.draft_vocab_size,
                       target.shape.vocab_size, head.config.vocab_ids if head else None)
    if head is None:
        head = EagleHead(EagleConfig.for_target(target.hf_model.config, capture, vocab_ids), target.embed_tokens)
        head = head.float()
        head.init_from_target(target.lm_head.weight.float(), target.norm.weight.float())
    cfg = EagleTrainConfig(seed=args.seed, ttt_steps=args.ttt_steps,
                           autocast_bf16=target.dtype == torch.bfloat16)
    state = train_eagle(head, seqs, out, TRAIN_SHARE * budget_s, cfg, resume=args.resume)
    head.save(out)
    held_out_ids = [chat_prompt_ids(engine.tokenizer, p) for p in held_out[: args.max_prompts]]
    evaluation = evaluate_eagle(args.target, out, held_out_ids, args.eval_max_tokens, engine.pair)
    facts = {
        "method": "eagle",
        "args": {k: str(v) for k, v in asdict(args).items()},
        "capture_layers": list(capture),
        "num_answers": len(answers),
        "num_sampled_answers": sum(a.round > 0 for a in answers),
        "num_trained_answers": len(seqs),
        "num_answer_tokens": sum(len(a.response_ids) for a in answers),
        "num_feature_tokens": sum(len(s.token_ids) for s in seqs),
        "sub_vocab_coverage": coverage(answers, vocab_ids),
        "train": {**asdict(state), "ttt_steps": cfg.ttt_steps},
        "head_params": sum(p.numel() for p in head.parameters()),
        "head_bytes": (out / "model.safetensors").stat().st_size,
        "wall_seconds": time.monotonic() - start,
        "evaluation": evaluation,
        **({"init_from": _lineage(args.init_from)} if args.init_from else {}),
    }
    (out / "distill.json").write_text(json.dumps(facts, indent=2))
    write_eagle_card(out, facts)
    return facts


def _init_head(path: Path, target) -> EagleHead:
    """A saved head to fine-tune (`--init-from`), in fp32 for training."""
    head = EagleHead.load(path, target.embed_tokens, torch.float32)
    if head.config.target_vocab_size != target.shape.vocab_size or \
            max(head.config.capture_layers) >= target.shape.num_layers:
        raise ValueError(f"--init-from {path}: this EAGLE head was made for another target")
    return head


def _lineage(path: Path) -> dict:
    """What the card says of a fine-tuned head's starting point: its path and, from its own `distill.json`, how
    it was made (read now: a run may write its result over the head it started from)."""
    facts = json.loads((path / "distill.json").read_text()) if (path / "distill.json").is_file() else {}
    train = facts.get("train", {})
    return {"path": str(path), "command": facts.get("args", {}).get("command"), "num_answers": facts.get("num_answers"),
            "steps": train.get("step"), "train_minutes": train["elapsed_s"] / 60 if "elapsed_s" in train else None,
            **({"init_from": facts["init_from"]} if "init_from" in facts else {})}


def _vocab(path: Path, answers, special_ids: list[int], size: int, full_vocab: int,
           fixed: Sequence[int] | None = None) -> list[int]:
    """The run's sub-vocabulary: the one already chosen in `path`, else `fixed` (a fine-tuned head's), else the
    `size` most frequent answer tokens."""
    fixed = None if fixed is None else list(fixed)  # a head's config holds a tuple; the file, a list
    if path.exists():
        vocab_ids = json.loads(path.read_text())
        if fixed is not None and vocab_ids != fixed:
            raise ValueError(f"{path} holds another sub-vocabulary than the head to fine-tune (--init-from)")
        return vocab_ids
    vocab_ids = fixed if fixed is not None else select_vocab(answers, special_ids, size, full_vocab)
    path.write_text(json.dumps(vocab_ids))
    return vocab_ids
