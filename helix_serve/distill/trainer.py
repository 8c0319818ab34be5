"""Train a draft to match the target's next-token distributions on the target's own answers.

Loss: cross-entropy of the draft against the target's stored top-k probabilities restricted to the
draft's sub-vocabulary (KL(p ‖ q) up to a constant, on the answer positions), whose minimiser is q ∝ p
there — the q that maximises the acceptance Σ min(p, q). The draft trains in fp32 (under bf16 autocast
where the CPU has native bf16). Checkpoints (weights, optimizer, step, elapsed time) every few minutes
make the run resumable.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from helix_serve.distill.data import Example
from helix_serve.model.vocab_map import VocabMap

CHECKPOINT = "checkpoint.pt"
LOSS_LOG = "loss.jsonl"


@dataclass(slots=True)
class TrainConfig:
    batch_size: int = 16
    max_len: int = 320
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    checkpoint_every_s: float = 300.0
    seed: int = 0
    autocast_bf16: bool = False  # only where the CPU has native bf16


@dataclass(slots=True)
class TrainState:
    step: int = 0
    elapsed_s: float = 0.0
    tokens: int = 0
    last_loss: float | None = None


def _batch(examples: list[Example], vocab: VocabMap, pad_id: int, max_len: int):
    """Right-padded [B, T] draft rows, attention mask, and [B, T, V_S] target probabilities (zero off answers)."""
    seqs = [(e.prompt_ids + e.response_ids)[:max_len] for e in examples]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = torch.zeros(len(seqs), width, len(vocab.row_to_target))
    for i, (e, s) in enumerate(zip(examples, seqs)):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        # sequence position t predicts token t+1: answer token j is predicted at len(prompt) - 1 + j
        start = len(e.prompt_ids) - 1
        n = min(len(e.response_ids), width - start)
        if n <= 0:
            continue
        top_ids = torch.tensor(e.top_ids[:n])  # [n, TOP_K] target ids
        probs = torch.tensor(e.top_probs[:n])
        inside = vocab.row_to_target[vocab.inputs(top_ids)] == top_ids  # ids the sub-vocabulary has
        rows = torch.arange(n)[:, None].expand_as(top_ids)
        targets[i, start + rows[inside], vocab.inputs(top_ids)[inside]] = probs[inside]
    return vocab.inputs(ids), mask, targets


def distill_loss(draft_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−Σ_x p(x) log q(x), averaged over the positions that have a target. [B, T, V_S] twice → scalar."""
    per_position = -(targets * draft_logits.float().log_softmax(-1)).sum(-1)  # [B, T]
    has_target = (targets.sum(-1) > 0).float()
    return (per_position * has_target).sum() / has_target.sum().clamp(min=1.0)


def _lr(cfg: TrainConfig, state: TrainState, budget_s: float) -> float:
    """Linear warm-up, then cosine decay over the time budget (time-based, so it survives a resume)."""
    warm = min(1.0, (state.step + 1) / cfg.warmup_steps)
    progress = min(1.0, state.elapsed_s / max(budget_s, 1.0))
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_draft(draft, vocab: VocabMap, examples: list[Example], out_dir: Path, budget_s: float, pad_id: int,
                cfg: TrainConfig, resume: bool) -> TrainState:
    """Train `draft` in place for `budget_s` seconds of training time (counted across resumes)."""
    torch.manual_seed(cfg.seed)
    draft.train()
    optimizer = torch.optim.AdamW(draft.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = TrainState()
    checkpoint = out_dir / CHECKPOINT
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        draft.load_state_dict(saved["draft"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState(**saved["state"])
    rng = random.Random(cfg.seed * 1_000_003 + state.step)  # reseeded from the step: resumes stay seeded
    log = (out_dir / LOSS_LOG).open("a")
    last_save = time.monotonic()
    bar = tqdm(total=int(budget_s), initial=int(state.elapsed_s), desc="distilling", unit="s")
    while state.elapsed_s < budget_s:
        start = time.monotonic()
        batch = rng.sample(examples, min(cfg.batch_size, len(examples)))
        rows, mask, targets = _batch(batch, vocab, pad_id, cfg.max_len)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            draft_logits = draft(input_ids=rows, attention_mask=mask).logits
        loss = distill_loss(draft_logits, targets)
        for group in optimizer.param_groups:
            group["lr"] = _lr(cfg, state, budget_s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        spent = time.monotonic() - start
        state.step += 1
        state.elapsed_s += spent
        state.tokens += int(mask.sum())
        state.last_loss = loss.item()
        log.write(json.dumps({"step": state.step, "loss": state.last_loss, "elapsed_s": state.elapsed_s}) + "\n")
        bar.update(int(state.elapsed_s) - bar.n)
        bar.set_postfix(step=state.step, loss=f"{state.last_loss:.3f}")
        if time.monotonic() - last_save > cfg.checkpoint_every_s:
            _save_checkpoint(checkpoint, draft, optimizer, state)
            last_save = time.monotonic()
            log.flush()
    _save_checkpoint(checkpoint, draft, optimizer, state)
    bar.close()
    log.close()
    draft.eval()
    return state


def _save_checkpoint(path: Path, draft, optimizer, state: TrainState) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"draft": draft.state_dict(), "optimizer": optimizer.state_dict(), "state": asdict(state)}, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last good checkpoint
