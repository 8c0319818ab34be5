"""The EAGLE head: the target's captured features, the head's paged and training paths, save/load."""

from __future__ import annotations

import pytest
import torch

from helix_serve.distill.eagle_data import FeatureSequence
from helix_serve.distill.eagle_trainer import make_batch, ttt_loss, unroll
from helix_serve.model.attention import AttentionMetadata
from helix_serve.model.eagle_head import EagleConfig, EagleHead, is_eagle_head
from helix_serve.model.loader import load_model
from helix_serve.model.paged_llm import KVCache

BLOCK = 4


@pytest.fixture(scope="module")
def target(llama_pair):
    return load_model(str(llama_pair[0]), torch.device("cpu"), "float32")


def _meta(lens: list[int], query_lens: list[int] | None = None) -> AttentionMetadata:
    """Sequence i owns blocks [16 i, 16 i + 16)."""
    tables = [list(range(16 * i, 16 * i + 16)) for i in range(len(lens))]
    return AttentionMetadata.build(tables, lens, query_lens or lens, BLOCK, torch.device("cpu"))


def _head(target, vocab_ids: list[int], seed: int = 3) -> EagleHead:
    torch.manual_seed(seed)
    config = EagleConfig.for_target(target.hf_model.config, (0, 1, 3), vocab_ids)
    head = EagleHead(config, target.embed_tokens).float().eval()
    with torch.no_grad():  # larger than default init, so that the test distinguishes paths
        for p in head.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return head


def test_captured_features_are_transformers_hidden_states(target):
    ids = [[5, 9, 31, 2, 77, 140, 8], [3, 4, 250, 17, 90]]  # ragged, across block boundaries
    kv = KVCache.allocate(target.shape, 64, BLOCK, torch.float32, torch.device("cpu"))
    flat = torch.tensor(ids[0] + ids[1])
    with torch.no_grad():
        hidden, features = target.forward_with_features(flat, _meta([7, 5]), kv, capture_layers=(0, 1, 2))
        plain = target(flat, _meta([7, 5]), kv)
        _, last = target.forward_with_features(flat, _meta([7, 5]), kv, capture_layers=(3,))
    assert features.shape == (12, 3 * 64)
    torch.testing.assert_close(hidden, plain, rtol=0, atol=0)  # capturing changes nothing
    torch.testing.assert_close(target.norm(last), hidden)  # index num_layers: the last layer's output, pre-norm
    for row, seq in zip((slice(0, 7), slice(7, 12)), ids):
        with torch.no_grad():
            states = target.hf_model(torch.tensor([seq]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(features[row], torch.cat([states[0][0], states[1][0], states[2][0]], -1),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ascending"):
        target.forward_with_features(torch.tensor(ids[0]), _meta([7]), kv, capture_layers=(2, 0))


def test_training_unroll_is_what_chained_paged_drafting_computes(target):
    """Dense training-time-test step j at row c == the paged head drafting token j+1 of the chain at c."""
    head = _head(target, list(range(0, 300, 3)))
    torch.manual_seed(0)
    ids = torch.randint(1, 300, (9,))
    features = torch.randn(9, 3 * 64)
    with torch.no_grad():
        dense = list(unroll(head, features[None], ids[None], steps=3))  # 3 x [1, 9, H]
        kv = KVCache.allocate(head.shape, 64, BLOCK, torch.float32, torch.device("cpu"))
        c = 5  # real entries 0..c (feature t with token t+1), then two chained entries on the head's own output
        real = head(head.fuse(features[: c + 1]), ids[1 : c + 2], _meta([c + 1]), kv)
        chained = [real[c]]
        for j in (1, 2):
            chained.append(head(chained[-1][None], ids[c + 1 + j : c + 2 + j], _meta([c + 1 + j], [1]), kv)[0])
    torch.testing.assert_close(dense[0][0, : c + 1], real, rtol=1e-5, atol=1e-5)
    for j in (1, 2):
        torch.testing.assert_close(dense[j][0, c], chained[j], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dense[1][0, c], dense[0][0, c + 1], atol=1e-3)  # own feature ≠ the real one


def test_ttt_loss_trains_and_head_round_trips_through_safetensors(target, tmp_path):
    vocab_ids = list(range(0, 300, 2))
    head = _head(target, vocab_ids)
    torch.manual_seed(1)
    seqs = [FeatureSequence(torch.randn(n, 192), torch.randint(0, 300, (n,), dtype=torch.int32),
                            torch.randint(0, 300, (n, 4), dtype=torch.int32), torch.rand(n, 4).half())
            for n in (7, 12)]
    target_to_row = torch.full((300,), -1)
    target_to_row[torch.tensor(vocab_ids)] = torch.arange(len(vocab_ids))
    batch = make_batch(seqs, target_to_row, max_len=10)
    assert batch.features.shape == (2, 10, 192) and batch.num_tokens == 17
    assert torch.allclose(batch.target_probs[0, :7].sum(-1), torch.ones(7))  # renormalised on the sub-vocabulary
    assert bool((batch.target_probs[0, 7:] == 0).all())  # padding: no loss
    loss, accuracy = ttt_loss(head, batch, steps=3)
    loss.backward()
    assert loss.item() > 0 and len(accuracy) == 3 and head.qkv.weight.grad.abs().sum() > 0

    head.save(tmp_path)
    assert is_eagle_head(tmp_path) and not is_eagle_head(tmp_path / "nowhere")
    loaded = EagleHead.load(tmp_path, target.embed_tokens, torch.float32)
    assert loaded.config == head.config and loaded.shape.vocab_size == len(vocab_ids)
    for (name, mine), theirs in zip(head.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(mine.to(torch.bfloat16).float(), theirs, rtol=0, atol=0, msg=name)
    assert (tmp_path / "model.safetensors").stat().st_size < 2 * sum(p.numel() for p in head.parameters()) + 4096
