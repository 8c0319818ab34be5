"""The draft architecture: the target's first layers, retrained as an early exit over a sub-vocabulary.

The draft is an ordinary checkpoint of the target's own architecture (a Qwen2 target gets a Qwen2 draft,
q/k/v biases included; transformers loads it as is) with `num_layers` layers of the target's shape,
initialised from the target's first layers, its final norm, and the embedding rows of the
`draft_vocab_size` tokens most frequent in the target's own answers. Its config carries `helix_vocab_map`
(draft row i ↔ target token id map[i]); the engine maps ids in and logits out, and target tokens outside
the sub-vocabulary get q = 0, which rejection sampling handles exactly.
Why: on a CPU the LM head over 49k tokens costs more than two layers, and the embedding alone would be
57 MB; a sub-vocabulary covering >99% of answer tokens keeps the draft small and its step cheap.
"""

from __future__ import annotations

from collections import Counter

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from helix_serve.distill.data import Example
from helix_serve.model.loader import check_architecture
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


def draft_config(target: PretrainedConfig, num_layers: int, vocab_size: int) -> PretrainedConfig:
    """The target's config (its own class) cut to `num_layers` layers and a tied `vocab_size`-row embedding."""
    check_architecture("the target", target)
    if not 1 <= num_layers <= target.num_hidden_layers:
        raise ValueError(f"the draft's layers are the target's first ones: --layers must be 1 to "
                         f"{target.num_hidden_layers}")
    fields = target.to_dict()
    fields.update(num_hidden_layers=num_layers, vocab_size=vocab_size, tie_word_embeddings=True)
    if fields.get("layer_types"):  # per-layer attention kinds (Qwen2): one per kept layer
        fields["layer_types"] = fields["layer_types"][:num_layers]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        fields[key] = None  # those ids are the target's, not rows of the draft's sub-vocabulary
    return type(target).from_dict(fields)


def build_draft(target: PreTrainedModel, num_layers: int, vocab_size: int) -> PreTrainedModel:
    """A `num_layers`-layer early exit of `target` (float32); its embedding rows come from `set_vocab`.

    Built before the target answers anything, so a config it cannot take fails in seconds, not mid-budget.
    """
    draft = AutoModelForCausalLM.from_config(draft_config(target.config, num_layers, vocab_size))
    with torch.no_grad():
        for mine, theirs in zip(draft.model.layers, target.model.layers):
            mine.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()})  # strict: biases too
        draft.model.norm.load_state_dict({k: v.float() for k, v in target.model.norm.state_dict().items()})
    return draft.float()


def set_vocab(draft: PreTrainedModel, target: PreTrainedModel, vocab_ids: list[int]) -> None:
    """Give `draft` the sub-vocabulary `vocab_ids`: the target's embedding rows and the id map in its config."""
    if len(vocab_ids) != draft.config.vocab_size:
        raise ValueError(f"{len(vocab_ids)} vocabulary ids for a draft of {draft.config.vocab_size} rows")
    setattr(draft.config, VOCAB_MAP_KEY, list(vocab_ids))
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight[torch.tensor(vocab_ids)].float())
    draft.tie_weights()
