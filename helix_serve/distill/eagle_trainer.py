"""Train an EAGLE head with the training-time test: unrolled over its own predicted features.

Row t of step j stands for the chain that starts at the real feature of position t: its feature input is
fc(target features at t) at step 0 and the head's own step j-1 output at row t after, its token is t+1+j,
its RoPE position t+j, and its keys are the step-0 keys at positions <= t plus row t's keys of steps 1..j —
exactly what the head's paged KV holds when it drafts token j+1 of a chain at inference. The loss at step
j is the cross-entropy against the target's top-k distribution of token t+2+j, restricted to the
sub-vocabulary and renormalised (KL up to a constant), weighted DEPTH_DECAY**j.
Seeded; checkpoints (head, optimizer, step, training time) every few minutes make a run resumable.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from helix_serve.distill.eagle_data import FeatureSequence
from helix_serve.model.eagle_head import EagleHead

CHECKPOINT = "eagle_checkpoint.pt"
LOSS_LOG = "loss.jsonl"
DEPTH_DECAY = 0.8


@dataclass(slots=True)
class EagleTrainConfig:
    batch_tokens: int = 4096
    max_len: int = 384
    ttt_steps: int = 3
    lr: float = 5e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    checkpoint_every_s: float = 240.0
    seed: int = 0
    autocast_bf16: bool = False  # only where the CPU has native bf16


@dataclass(slots=True)
class EagleTrainState:
    step: int = 0
    elapsed_s: float = 0.0
    tokens: int = 0
    last_loss: float | None = None
    last_accuracy: list[float] | None = None  # per depth: head argmax == target argmax


@dataclass(slots=True)
class Batch:
    features: torch.Tensor  # [B, T, 3H]
    token_ids: torch.Tensor  # [B, T] target ids (0 past the end)
    target_rows: torch.Tensor  # [B, T, K] sub-vocabulary rows of the target's top-k next tokens (0 if absent)
    target_probs: torch.Tensor  # [B, T, K] renormalised over the rows the sub-vocabulary has; 0 = no loss there
    num_tokens: int


def make_batch(seqs: list[FeatureSequence], target_to_row: torch.Tensor, max_len: int) -> Batch:
    """Right-padded tensors of `seqs` cut to `max_len`. target_to_row: [V_target] row or -1."""
    width = min(max(len(s.token_ids) for s in seqs), max_len)
    num, dim, k = len(seqs), seqs[0].features.shape[-1], seqs[0].top_ids.shape[-1]
    features = torch.zeros(num, width, dim, dtype=seqs[0].features.dtype)
    ids = torch.zeros(num, width, dtype=torch.long)
    rows = torch.zeros(num, width, k, dtype=torch.long)
    probs = torch.zeros(num, width, k)
    for i, s in enumerate(seqs):
        n = min(len(s.token_ids), width)
        features[i, :n], ids[i, :n] = s.features[:n], s.token_ids[:n].long()
        mapped = target_to_row[s.top_ids[:n].long()]  # [n, K]
        p = s.top_probs[:n].float() * (mapped >= 0)
        probs[i, :n] = p / p.sum(-1, keepdim=True).clamp(min=1e-9)
        rows[i, :n] = mapped.clamp(min=0)
    return Batch(features, ids, rows, probs, sum(min(len(s.token_ids), width) for s in seqs))


def _shift(x: torch.Tensor, by: int) -> torch.Tensor:
    """x[:, t] ← x[:, t + by], zero-filled at the end."""
    out = torch.zeros_like(x)
    if by < x.shape[1]:
        out[:, : x.shape[1] - by] = x[:, by:]
    return out


def _ttt_mask(width: int, step: int) -> torch.Tensor:
    """[T, T * (step + 1)] True = may attend: causal over step 0's keys, row t's own key in each later step."""
    eye = torch.eye(width, dtype=torch.bool)
    return torch.cat([torch.ones(width, width, dtype=torch.bool).tril()] + [eye] * step, dim=1)


def _attend(head: EagleHead, q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """q [B, T, heads, D], keys/values per step [B, T, kv_heads, D] → [B, T, heads * D]."""
    group = head.config.num_heads // head.config.num_kv_heads
    k = torch.cat(keys, dim=1).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, heads, T * steps, D]
    v = torch.cat(values, dim=1).transpose(1, 2).repeat_interleave(group, dim=1)
    mask = _ttt_mask(q.shape[1], len(keys) - 1).to(q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=head.scale)
    return out.transpose(1, 2).flatten(2)


def unroll(head: EagleHead, features: torch.Tensor, token_ids: torch.Tensor, steps: int):
    """Yield the head's [B, T, H] output features of each training-time-test step (module docstring)."""
    width = token_ids.shape[1]
    feature = head.fuse(features)  # [B, T, H]
    keys, values = [], []
    for j in range(steps):
        positions = torch.arange(j, width + j).expand_as(token_ids)
        q, k, v = head.qkv_rope(feature, _shift(token_ids, 1 + j), positions)
        keys.append(k)
        values.append(v)
        feature = head.finish(feature, _attend(head, q, keys, values))
        yield feature


def ttt_loss(head: EagleHead, batch: Batch, steps: int) -> tuple[torch.Tensor, list[float]]:
    """The depth-weighted soft cross-entropy over `steps` unrolled steps, and each step's top-1 agreement."""
    losses, accuracy = [], []
    for j, feature in enumerate(unroll(head, batch.features, batch.token_ids, steps)):
        probs, rows = _shift(batch.target_probs, 1 + j), _shift(batch.target_rows, 1 + j)
        scored = probs.sum(-1) > 0  # [B, T]: rows whose token t+2+j is an answer token
        logp = head.compute_logits(feature[scored]).log_softmax(-1)  # [N, V_sub], scored rows only
        losses.append(-(probs[scored] * logp.gather(1, rows[scored])).sum(-1).mean())
        accuracy.append((logp.argmax(-1) == rows[scored][:, 0]).float().mean().item())
    weights = [DEPTH_DECAY**j for j in range(steps)]
    return sum(w * loss for w, loss in zip(weights, losses)) / sum(weights), accuracy


def _lr(cfg: EagleTrainConfig, state: EagleTrainState, budget_s: float) -> float:
    """Linear warm-up, then cosine decay over the time budget (time-based, so it survives a resume)."""
    warm = min(1.0, (state.step + 1) / cfg.warmup_steps)
    progress = min(1.0, state.elapsed_s / max(budget_s, 1.0))
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _sample(rng: random.Random, seqs: list[FeatureSequence], cfg: EagleTrainConfig) -> list[FeatureSequence]:
    """Random answers up to about `batch_tokens` tokens."""
    batch, tokens = [], 0
    while tokens < cfg.batch_tokens and len(batch) < len(seqs):
        seq = seqs[rng.randrange(len(seqs))]
        batch.append(seq)
        tokens += min(len(seq.token_ids), cfg.max_len)
    return batch


def train_eagle(head: EagleHead, seqs: list[FeatureSequence], out_dir: Path, budget_s: float,
                cfg: EagleTrainConfig, resume: bool) -> EagleTrainState:
    """Train `head` in place for `budget_s` seconds of training time (counted across resumes)."""
    torch.manual_seed(cfg.seed)
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state, checkpoint = EagleTrainState(), out_dir / CHECKPOINT
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        state = EagleTrainState(**saved["state"])
    target_to_row = torch.full((head.config.target_vocab_size,), -1, dtype=torch.long)
    target_to_row[torch.tensor(head.config.vocab_ids)] = torch.arange(len(head.config.vocab_ids))
    rng = random.Random(cfg.seed * 1_000_003 + state.step)  # reseeded from the step: resumes stay seeded
    last_save = time.monotonic()
    with (out_dir / LOSS_LOG).open("a") as log:
        bar = tqdm(total=int(budget_s), initial=int(state.elapsed_s), desc="training the EAGLE head", unit="s")
        while state.elapsed_s < budget_s:
            start = time.monotonic()
            batch = make_batch(_sample(rng, seqs, cfg), target_to_row, cfg.max_len)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
                loss, accuracy = ttt_loss(head, batch, cfg.ttt_steps)
            for group in optimizer.param_groups:
                group["lr"] = _lr(cfg, state, budget_s)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            state.step += 1
            state.elapsed_s += time.monotonic() - start
            state.tokens += batch.num_tokens
            state.last_loss, state.last_accuracy = loss.item(), accuracy
            log.write(json.dumps({"step": state.step, "loss": state.last_loss, "accuracy": accuracy,
                                  "elapsed_s": state.elapsed_s}) + "\n")
            log.flush()
            bar.update(int(state.elapsed_s) - bar.n)
            bar.set_postfix(step=state.step, loss=f"{state.last_loss:.3f}", acc0=f"{accuracy[0]:.2f}")
            if time.monotonic() - last_save > cfg.checkpoint_every_s:
                save_checkpoint(checkpoint, head, optimizer, state)
                last_save = time.monotonic()
        bar.close()
    save_checkpoint(checkpoint, head, optimizer, state)
    head.eval()
    return state


def save_checkpoint(path: Path, head: EagleHead, optimizer, state: EagleTrainState) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "state": asdict(state)}, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last good checkpoint
