"""The paged forward pass matches transformers' own forward (fp32, atol 1e-4 on logits)."""

import pytest
import torch

from helix_serve.model.attention import AttentionMetadata
from helix_serve.model.loader import load_model
from helix_serve.model.paged_llm import KVCache, linear
from helix_serve.model.row_padding import MAX_ROWS, choose_widths

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


def test_fp32_cpu_passes_compute_at_the_measured_widths(llama_pair):
    """A CPU fp32 model times its widths once per shape (row_padding.py); a padded pass computes the same logits."""
    target_dir, _ = llama_pair
    model = load_model(str(target_dir), CPU, "float32")
    assert len(model.row_widths) == MAX_ROWS + 1 and all(n <= w <= MAX_ROWS for n, w in enumerate(model.row_widths))
    assert load_model(str(target_dir), CPU, "float32").row_widths is model.row_widths  # timed once per process
    assert load_model(str(target_dir), CPU, "bfloat16").row_widths == ()
    ids = torch.randint(1, model.shape.vocab_size, (13,), generator=torch.Generator().manual_seed(1))
    logits = {}
    for widths in (model.row_widths, (), tuple(range(13)) + (32,) * 116):  # measured, none, every pass of 13 → 32
        model.row_widths = widths
        kv = KVCache.allocate(model.shape, 8, 4, torch.float32, CPU)
        with torch.no_grad():
            logits[widths] = model.compute_logits(model(ids, AttentionMetadata.build([[1, 2, 3, 4]], [13], [13], 4,
                                                                                     CPU), kv))
    first, *others = logits.values()
    for other in others:
        torch.testing.assert_close(other, first, atol=1e-5, rtol=1e-5)


def test_widths_pad_only_to_a_clearly_cheaper_width():
    """The choice from measured times: the narrowest of the cheapest widths at or above n (within TIE), when it saves
    at least 1 − GAIN; widths streamed from memory (up to COLD_ROWS) and from cache are not compared."""
    seconds = [float("inf"), 2.0, 1.0, 0.98, 1.3,  # streamed: 1 → 2 (3 is a tie with 2)
               2.0, 2.1, 2.2, 1.4, 3.0, 3.2, 2.2, 2.25]  # from cache: 5–7 → 8, 9 and 10 → 11, 12 stays
    assert choose_widths(seconds) == (0, 2, 2, 3, 4, 8, 8, 8, 8, 11, 11, 11, 12)
    assert choose_widths([float("inf"), 5.0, 5.0, 5.0, 5.0, 1.0]) == (0, 1, 2, 3, 4, 5)  # 5 is timed from cache
    assert choose_widths([float("inf"), 2.0, 1.6]) == (0, 1, 2)  # 20 % is not enough


def test_tied_embeddings_share_the_lm_head(llama_pair):
    _, draft_dir = llama_pair
    model = load_model(str(draft_dir), CPU, "float32")
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("rows", [1, 2, 5, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_major_linear_equals_the_layer(rows, bias):
    layer = torch.nn.Linear(64, 96, bias=bias)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    widths = list(range(400))
    widths[1], widths[2], widths[5] = 2, 16, 16  # padded: the extra rows' outputs are dropped
    with torch.no_grad():
        for got in (linear(x, layer), linear(x, layer, widths)):
            assert got.shape == (rows, 96)
            torch.testing.assert_close(got, layer(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear(x.bfloat16(), layer.bfloat16()), layer(x.bfloat16()))  # bf16: F.linear
