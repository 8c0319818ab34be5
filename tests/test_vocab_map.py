"""Drafts whose vocabulary differs from the target's: fewer embedding rows, or a sub-vocabulary map."""

from __future__ import annotations

import pytest
import torch

from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.model.vocab_map import VocabMap
from tests.helpers import make_engine
from tests.model_factory import make_model, make_tokenizer

CPU = torch.device("cpu")


def test_same_vocabulary_is_the_identity():
    vocab = VocabMap(10, 10, None, CPU)
    ids, logits = torch.tensor([0, 9]), torch.randn(2, 10)
    assert vocab.inputs(ids) is ids and vocab.logits(logits) is logits


def test_fewer_draft_rows_clamps_inputs_and_pads_logits():
    vocab = VocabMap(6, 10, None, CPU)
    assert vocab.inputs(torch.tensor([0, 5, 6, 9])).tolist() == [0, 5, 0, 0]
    out = vocab.logits(torch.arange(12.0).view(2, 6))
    assert out[:, :6].tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    assert torch.isneginf(out[:, 6:]).all()


def test_sub_vocabulary_maps_rows_to_target_ids():
    vocab = VocabMap(3, 8, [1, 4, 6], CPU)
    assert vocab.inputs(torch.tensor([1, 4, 6, 7])).tolist() == [0, 1, 2, 0]
    out = vocab.logits(torch.tensor([[1.0, 2.0, 3.0]]))
    assert out[0, [1, 4, 6]].tolist() == [1.0, 2.0, 3.0]
    assert torch.isneginf(out[0, [0, 2, 3, 5, 7]]).all()
    with pytest.raises(ValueError, match="past the target"):
        VocabMap(2, 5, [1, 5], CPU)


@pytest.fixture(scope="module")
def padded_pair(tmp_path_factory):
    """A target with 24 embedding rows past the tokenizer (as Qwen2.5-7B has) and a draft without them."""
    root = tmp_path_factory.mktemp("padded")
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    dirs = []
    for name, model in (("target", make_model("llama", vocab + 24, 64, 2, 4, 2, seed=5)),
                        ("draft", make_model("llama", vocab, 32, 1, 2, 1, seed=6, tie=True))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs[0], dirs[1], vocab


def test_target_ids_past_the_draft_rows_do_not_break_the_draft(padded_pair):
    target, draft, draft_rows = padded_pair
    engine = make_engine((target, draft))
    prompts = [[5, draft_rows + 3, 7, draft_rows + 20, 9], [draft_rows + 1, 11, 12]]  # ids the draft has no row for
    speculative = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True, num_speculative_tokens=4))
    plain = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True, speculative=False))
    assert [o.finish_reason for o in speculative] == ["length", "length"]
    assert [o.token_ids for o in speculative] == [o.token_ids for o in plain]
    assert engine.block_manager.num_used_blocks == 0
