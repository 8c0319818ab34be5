"""Build small random-weight checkpoints (config.json + model.safetensors + tokenizer) on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "speculative decoding drafts tokens and the target verifies them",
    "paged attention reads keys and values through a block table",
    "def add(a, b):\n    return a + b\n",
] * 20


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_model(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, seed: int,
               tie: bool = False, rope_scaling: dict | None = None):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=tie, eos_token_id=0, bos_token_id=0)
    if rope_scaling:
        kwargs["rope_scaling"] = rope_scaling
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    # Larger-than-default weights make the distributions peaked enough that draft and target disagree often.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def make_pair_dirs(root: Path, arch: str) -> tuple[Path, Path]:
    """A target (GQA, untied or rope-scaled) and a smaller draft sharing one tokenizer."""
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    scaling = {"rope_type": "linear", "factor": 2.0} if arch == "llama" else None
    target = make_model(arch, vocab, 64, 3, 4, 2, seed=1, tie=False, rope_scaling=scaling)
    draft = make_model(arch, vocab, 32, 1, 2, 1, seed=2, tie=True)
    dirs = []
    for name, model in (("target", target), ("draft", draft)):
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


def make_scripted_dir(root: Path, tokenizer, script: list[int]) -> Path:
    """A Llama that greedily continues `script` as a cycle: after script[i] it emits script[i + 1].

    The layers' output projections are zero, so the last hidden state is the current token's embedding;
    script tokens embed as distinct basis vectors and the LM head maps each to its successor (logit 80 vs 0).
    """
    hidden = 64
    assert len(set(script)) == len(script) <= hidden, "a cycle of distinct tokens, at most one per dimension"
    model = make_model("llama", len(tokenizer), hidden, 2, 4, 2, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for j, token in enumerate(script):
            embed[token] = 0.0
            embed[token, j] = 1.0
            head[script[(j + 1) % len(script)], j] = 10.0  # the final norm scales the unit vector to 8
    path = root / "scripted"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
