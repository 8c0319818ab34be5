"""The draft architecture: the target's first layers, retrained as an early exit over a sub-vocabulary.

The draft is an ordinary Llama checkpoint (transformers loads it as is) with `num_layers` layers of the
target's shape, initialised from the target's first layers, its final norm, and the embedding rows of
the `draft_vocab_size` tokens most frequent in the target's own answers. Its config carries
`helix_vocab_map` (draft row i ↔ target token id map[i]); the engine maps ids in and logits out, and
target tokens outside the sub-vocabulary get q = 0, which rejection sampling handles exactly.
Why: on a CPU the LM head over 49k tokens costs more than two layers, and the embedding alone would be
57 MB; a sub-vocabulary covering >99% of answer tokens keeps the draft small and its step cheap.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helix_serve.distill.data import Example
from helix_serve.model.vocab_map import VOCAB_MAP_KEY


def select_vocab(examples: list[Example], special_ids: list[int], size: int, full_vocab: int) -> list[int]:
    """The `size` target ids the draft can emit: special tokens, then by frequency, then lowest ids."""
    counts = Counter(t for e in examples for t in e.prompt_ids + e.response_ids)
    chosen = dict.fromkeys(sorted(set(special_ids) | {0}))
    chosen.update(dict.fromkeys(t for t, _ in counts.most_common()))
    chosen.update(dict.fromkeys(range(full_vocab)))  # byte-level BPE: low ids are the common merges
    return sorted(list(chosen)[: min(size, full_vocab)])


def coverage(examples: list[Example], vocab_ids: list[int]) -> float:
    """Share of answer tokens the sub-vocabulary contains."""
    allowed = set(vocab_ids)
    tokens = [t for e in examples for t in e.response_ids]
    return sum(t in allowed for t in tokens) / max(len(tokens), 1)


def build_draft(target: LlamaForCausalLM, vocab_ids: list[int], num_layers: int) -> LlamaForCausalLM:
    """A `num_layers`-layer early exit of `target` over the sub-vocabulary `vocab_ids` (float32)."""
    config: LlamaConfig = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    config.vocab_size = len(vocab_ids)
    config.tie_word_embeddings = True
    setattr(config, VOCAB_MAP_KEY, list(vocab_ids))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        setattr(config, key, None)  # those ids are the target's, not rows of the draft's sub-vocabulary
    draft = LlamaForCausalLM(config)
    index = torch.tensor(vocab_ids)
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight[index].float())
        for mine, theirs in zip(draft.model.layers, target.model.layers):
            mine.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()})
        draft.model.norm.load_state_dict({k: v.float() for k, v in target.model.norm.state_dict().items()})
    draft.tie_weights()
    return draft.float()
