"""The paged forward pass matches transformers' own forward (fp32, atol 1e-4 on logits)."""

import pytest
import torch

from helix_serve.model.attention import AttentionMetadata
from helix_serve.model.loader import load_model
from helix_serve.model.paged_llm import KVCache, linear

CPU = torch.device("cpu")


@pytest.mark.parametrize("pair", ["llama_pair", "qwen2_pair"])
def test_prefill_then_decode_matches_transformers(pair, request):
    target_dir, _ = request.getfixturevalue(pair)
    model = load_model(str(target_dir), CPU, "float32")
    ids = torch.randint(1, model.shape.vocab_size, (1, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.hf_model(ids).logits[0]  # [21, V]
    block_size, table = 4, [5, 2, 9, 0, 7, 3]
    kv = KVCache.allocate(model.shape, 10, block_size, torch.float32, CPU)
    with torch.no_grad():
        # 13-token prefill, then a 1-token decode, then a 7-token verify-shaped chunk
        got = []
        for start, end in ((0, 13), (13, 14), (14, 21)):
            meta = AttentionMetadata.build([table], [end], [end - start], block_size, CPU)
            got.append(model.compute_logits(model(ids[0, start:end], meta, kv)))
    torch.testing.assert_close(torch.cat(got), expected, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_share_the_lm_head(llama_pair):
    _, draft_dir = llama_pair
    model = load_model(str(draft_dir), CPU, "float32")
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("rows", [1, 2, 5, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_major_linear_equals_the_layer(rows, bias):
    layer = torch.nn.Linear(64, 96, bias=bias)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        got = linear(x, layer)
        assert got.shape == (rows, 96)
        torch.testing.assert_close(got, layer(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear(x.bfloat16(), layer.bfloat16()), layer(x.bfloat16()))  # bf16: F.linear
