"""Paged attention over a scattered block pool equals dense causal SDPA."""

import pytest
import torch
import torch.nn.functional as F

from helix_serve.model.attention import AttentionMetadata, context_class, paged_attention, query_class


def _dense_reference(q, k, v, start):
    """Causal attention of queries at positions start.. over keys 0..start+len(q)-1 (GQA expanded)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    pos_q = torch.arange(start, start + q.shape[0])
    mask = torch.arange(k.shape[0])[None, :] <= pos_q[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


# (cached tokens, new tokens) per sequence: a prefill, a decode, a multi-token verify across a block edge; decode
# rows between the others (they are attended apart from the multi-token rows and put back in place); rows of four
# query classes (1, 2 … 9, 10 … 18, 19 … 36 tokens) interleaved; and contexts of three classes (≤ 128, 129 … 256,
# 257 … 512 tokens)
@pytest.mark.parametrize("shapes", [[(0, 7), (9, 1), (6, 5)], [(9, 1), (0, 7), (3, 1), (6, 5), (2, 1)],
                                    [(9, 1), (0, 14), (3, 3), (2, 12), (5, 1), (1, 19)],
                                    [(9, 1), (300, 1), (140, 3), (4, 1), (139, 1)]])
def test_paged_attention_matches_dense_on_ragged_batch(shapes):
    torch.manual_seed(0)
    block_size, num_blocks, heads, kv_heads, dim = 4, 200, 4, 2, 8
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(num_blocks).tolist()  # scattered, non-contiguous block ids
    tables, full_k, full_v = [], [], []
    for cached, new in shapes:
        n = cached + new
        used = sum(map(len, tables))
        tables.append(perm[used: used + -(-n // block_size)])
        full_k.append(torch.randn(n, kv_heads, dim))
        full_v.append(torch.randn(n, kv_heads, dim))
    # Write the already-cached prefix through the same slot path, as earlier steps would have.
    for (cached, _), table, k, v in zip(shapes, tables, full_k, full_v):
        if cached:
            meta = AttentionMetadata.build([table], [cached], [cached], block_size, torch.device("cpu"))
            paged_attention(torch.randn(cached, heads, dim), k[:cached], v[:cached], k_cache, v_cache, meta, dim**-0.5)
    queries = [torch.randn(new, heads, dim) for _, new in shapes]
    meta = AttentionMetadata.build(tables, [c + n for c, n in shapes], [n for _, n in shapes], block_size,
                                   torch.device("cpu"))
    out = paged_attention(
        torch.cat(queries), torch.cat([k[c:] for (c, _), k in zip(shapes, full_k)]),
        torch.cat([v[c:] for (c, _), v in zip(shapes, full_v)]), k_cache, v_cache, meta, dim**-0.5,
    )
    expected = torch.cat([_dense_reference(q, k, v, c) for q, k, v, (c, _) in zip(queries, full_k, full_v, shapes)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rows_are_attended_apart_by_class_not_padded_to_the_longest_query_or_context():
    """Decode rows (1 token), verify rows (2 … 9) and prefill chunks (by powers of two) each form their own batch.
    Measured on a 2-core Xeon (int4, 16 rows, context 300): 15 decode rows beside one 17-token row cost 124 ms
    padded to 17 queries each, 92 ms attended apart; for verify rows beside a prefill row, see `query_class`."""
    assert [query_class(n) for n in (1, 2, 9, 10, 18, 19, 36, 37, 300)] == [0, 1, 1, 2, 2, 3, 3, 4, 7]
    meta = AttentionMetadata.build([[1], [2], [3], [4], [5]], [5, 17, 3, 9, 40], [1, 17, 1, 4, 3], 32,
                                   torch.device("cpu"))
    (one_tokens, one), (verify_tokens, verify), (prefill_tokens, prefill) = meta.parts
    assert one.attn_mask.shape[:3] == (2, 1, 1) and one_tokens.tolist() == [0, 18]
    assert verify.attn_mask.shape[:3] == (2, 1, 4) and verify_tokens.tolist() == [*range(19, 23), *range(23, 26)]
    assert prefill.attn_mask.shape[:3] == (1, 1, 17) and prefill_tokens.tolist() == [*range(1, 18)]
    assert not AttentionMetadata.build([[1], [2]], [5, 9], [1, 1], 32, torch.device("cpu")).parts  # uniform: one batch
    assert not AttentionMetadata.build([[1], [2]], [5, 9], [2, 4], 32, torch.device("cpu")).parts  # one class
    # one long context among short ones: not every row padded to it
    assert [context_class(n) for n in (1, 128, 129, 256, 257, 1000)] == [0, 0, 1, 1, 2, 3]
    meta = AttentionMetadata.build([[1], [2, 3, 4], [5]], [100, 1000, 120], [1, 1, 1], 512, torch.device("cpu"))
    assert [(t.tolist(), p.attn_mask.shape[-1]) for t, p in meta.parts] == [([0, 2], 120), ([1], 1000)]


def test_slot_mapping_addresses_block_table():
    meta = AttentionMetadata.build([[7, 2], [5]], [6, 3], [3, 3], 4, torch.device("cpu"))
    # seq 0 positions 3,4,5 -> block 7 offset 3, block 2 offsets 0,1; seq 1 positions 0..2 -> block 5
    assert meta.slot_mapping.tolist() == [7 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 5 * 4 + 0, 5 * 4 + 1, 5 * 4 + 2]
    assert meta.positions.tolist() == [3, 4, 5, 0, 1, 2]


@pytest.mark.parametrize("shapes", [[(9, 1)], [(9, 1), (30, 1), (4, 1)], [(6, 5), (2, 3)], [(0, 7), (9, 1), (6, 5)],
                                    [(9, 1), (0, 40), (3, 3)]])
def test_small_and_wide_passes_index_their_tokens_alike(shapes, monkeypatch):
    """A few tokens' indices are built as Python lists, a wide pass's with tensor ops: the same metadata."""
    from helix_serve.model import attention

    tables = [[(7 * i + j) % 50 for j in range(12)] for i in range(len(shapes))]
    args = (tables, [c + n for c, n in shapes], [n for _, n in shapes], 4, torch.device("cpu"))
    built = {}
    for small in (0, 10_000):
        monkeypatch.setattr(attention, "SMALL_PASS_TOKENS", small)
        built[small] = AttentionMetadata.build(*args)

    def same(a, b):
        for name in ("positions", "slot_mapping", "block_tables", "query_batch_idx", "query_offset", "attn_mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.max_context == b.max_context and len(a.parts) == len(b.parts)
        for (tokens_a, part_a), (tokens_b, part_b) in zip(a.parts, b.parts):
            assert torch.equal(tokens_a, tokens_b)
            same(part_a, part_b)
    same(built[0], built[10_000])
