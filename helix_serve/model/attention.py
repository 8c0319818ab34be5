"""Attention that writes and reads K/V directly in the paged block pool.

One `AttentionMetadata` describes a varlen batch: every sequence contributes `query_len` new tokens
that sit at the end of its `context_len` tokens. New K/V go to the pool through `slot_mapping`
(block_id * block_size + offset); attention gathers each sequence's context through its block table.
Only torch ops that exist in torch 2.4 are used (torch-directml pins it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(slots=True)
class AttentionMetadata:
    """Batch layout shared by every layer of one forward pass."""

    positions: torch.Tensor  # [T] absolute position of each query token
    slot_mapping: torch.Tensor  # [T] pool slot each new K/V is written to
    block_tables: torch.Tensor  # [B, max_blocks] block ids (padding entries are never unmasked)
    query_batch_idx: torch.Tensor  # [T] sequence index of each query token
    query_offset: torch.Tensor  # [T] index of each query token inside its sequence's chunk
    attn_mask: torch.Tensor  # [B, 1, max_query_len, max_context_len] True = may attend
    query_lens: list[int]
    max_context: int  # the longest row's context: every position is below it
    # Rows of each class (`row_class`: query length and context length) attended apart when several are present:
    # padding every row to the longest query and the longest context would cost the others that much each.
    parts: list[tuple[torch.Tensor, AttentionMetadata]] = field(default_factory=list)  # (token indices, rows)
    _grouped_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def grouped_mask(self, group: int) -> torch.Tensor:
        """The mask tiled for `group` query heads per kv head, [B, 1, group * max_q, ctx]; built once per forward.
        With one query per row every head's row is the same: the [B, 1, 1, ctx] mask broadcasts, no copy."""
        if group == 1 or self.attn_mask.shape[2] == 1:
            return self.attn_mask
        if group not in self._grouped_masks:
            self._grouped_masks[group] = self.attn_mask.repeat(1, 1, group, 1)
        return self._grouped_masks[group]

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        context_lens: list[int],
        query_lens: list[int],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """Metadata for sequences whose last `query_lens[i]` of `context_lens[i]` tokens are new."""
        num_seqs, max_q, max_ctx = len(query_lens), max(query_lens), max(context_lens)
        num_ctx_blocks = -(-max_ctx // block_size)  # one tensor from padded rows: no per-row tensor ops
        rows = [blocks[:num_ctx_blocks] + [0] * (num_ctx_blocks - len(blocks)) for blocks in block_tables]
        table = torch.tensor(rows, dtype=torch.long)
        batch_idx, offset, positions, slots = _token_index(rows, table, context_lens, query_lens, block_size)

        # Each query sees keys at positions <= its own; padding query rows see key 0 only (never NaN).
        if positions.shape[0] == num_seqs * max_q:  # every row has max_q queries: nothing to pad
            query_pos = positions.view(num_seqs, max_q)
        else:
            query_pos = torch.zeros(num_seqs, max_q, dtype=torch.long)
            query_pos[batch_idx, offset] = positions
        mask = torch.arange(max_ctx) <= query_pos[:, None, :, None]  # [B, 1, max_q, max_ctx]
        meta = cls(
            positions=positions.to(device),
            slot_mapping=slots.to(device),
            block_tables=table.to(device),
            query_batch_idx=batch_idx.to(device),
            query_offset=offset.to(device),
            attn_mask=mask.to(device),
            query_lens=list(query_lens),
            max_context=max_ctx,
        )
        kinds = [row_class(n, c) for n, c in zip(query_lens, context_lens)]
        if len(set(kinds)) > 1:  # a part holds one class: no deeper split
            meta.parts = [cls._part(block_tables, context_lens, query_lens, block_size, device,
                                    [i for i, k in enumerate(kinds) if k == kind]) for kind in sorted(set(kinds))]
        return meta

    @classmethod
    def _part(cls, block_tables: list[list[int]], context_lens: list[int], query_lens: list[int], block_size: int,
              device: torch.device, rows: list[int]) -> tuple[torch.Tensor, AttentionMetadata]:
        """These rows (one class) as a batch of their own, and their tokens' indices."""
        starts = [0, *itertools.accumulate(query_lens)]
        tokens = torch.tensor([t for i in rows for t in range(starts[i], starts[i + 1])], dtype=torch.long)
        part = cls.build([block_tables[i] for i in rows], [context_lens[i] for i in rows],
                         [query_lens[i] for i in rows], block_size, device)
        return tokens.to(device), part


SMALL_PASS_TOKENS = 32  # up to this many tokens a pass's per-token indices are built as Python lists


def _token_index(rows: list[list[int]], table: torch.Tensor, context_lens: list[int], query_lens: list[int],
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each new token's sequence index, offset inside its chunk, position and pool slot, as [T] tensors. A decode
    or verify pass of a few rows builds them as Python lists (four tensors made; the dozen small tensor ops of the
    general form cost ~20 µs more a pass, ~0.1 ms a drafting step at batch 1); wider passes use the tensor ops."""
    if sum(query_lens) <= SMALL_PASS_TOKENS:
        batch_idx = [i for i, n in enumerate(query_lens) for _ in range(n)]
        offset = [t for n in query_lens for t in range(n)]
        positions = [c - n + t for c, n in zip(context_lens, query_lens) for t in range(n)]
        slots = [rows[i][p // block_size] * block_size + p % block_size for i, p in zip(batch_idx, positions)]
        return tuple(torch.tensor(x, dtype=torch.long) for x in (batch_idx, offset, positions, slots))
    q_lens = torch.tensor(query_lens, dtype=torch.long)
    batch_idx = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)  # [T]
    offset = torch.arange(batch_idx.shape[0]) - (torch.cumsum(q_lens, 0) - q_lens)[batch_idx]  # [T]
    positions = torch.tensor([c - n for c, n in zip(context_lens, query_lens)])[batch_idx] + offset  # [T]
    slots = table[batch_idx, positions // block_size] * block_size + positions % block_size
    return batch_idx, offset, positions, slots


VERIFY_QUERY = 9  # the longest query of a verify row at the default k_max (8 drafts and the bonus position)


def query_class(query_len: int) -> int:
    """Rows of one query token (decode), of a verify row's few, and of longer chunks by powers of two (prefill, at
    most 2x padding), each class attended apart. Measured on a 2-core EPYC Zen 5 (int4; 17 verify rows of 3 tokens
    and 15 decode rows at context 180, the fastest of 6 interleaved runs): beside a 14-token prefill row the pass
    took 210 ms with every multi-token row padded to 14 queries and 147 ms with that row apart (no prefill row:
    146–155); beside a 120-token row 657 and 303–329 ms. A part costs a few small ops per layer, so verify rows
    (2 … 9 tokens) stay one class."""
    if query_len <= VERIFY_QUERY:
        return min(query_len, 2) - 1
    return 1 + (-(-query_len // VERIFY_QUERY) - 1).bit_length()


SHORT_CONTEXT = 128  # contexts up to this are one class; longer ones by powers of two


def context_class(context_len: int) -> int:
    """Every row of a batch gathers and attends over the batch's longest context (one padded tensor), so rows of
    very different contexts are attended apart, by powers of two (at most 2x padding). Measured on a 2-core EPYC
    Zen 5 (int4, 32 decode rows, the fastest of 7 interleaved runs): all at context 100 took 64 ms, at 300 96 ms;
    31 at 100 and one at 300 109 ms padded, 73 ms apart; 31 at 100 and one at 1,000 675 ms padded, 71 ms apart."""
    return max(-(-context_len // SHORT_CONTEXT) - 1, 0).bit_length()


def row_class(query_len: int, context_len: int) -> tuple[int, int]:
    return query_class(query_len), context_class(context_len)


def gathered_context(query_lens: list[int], context_lens: list[int]) -> int:
    """K/V positions a pass's attention gathers: each class's rows times the class's longest context."""
    longest: dict[tuple[int, int], list[int]] = {}
    for n, c in zip(query_lens, context_lens):
        entry = longest.setdefault(row_class(n, c), [0, 0])
        entry[0], entry[1] = entry[0] + 1, max(entry[1], c)
    return sum(rows * context for rows, context in longest.values())


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new K/V ([T, kv_heads, head_dim]) into their pool slots, in place."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the new tokens over their paged context.

    Args:
        query: [T, heads, head_dim]; key, value: [T, kv_heads, head_dim] for the same new tokens.
        k_cache, v_cache: one layer's pool, [num_blocks, block_size, kv_heads, head_dim].
    Returns:
        [T, heads, head_dim]
    """
    write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
    if meta.parts:
        out = torch.empty_like(query)
        for tokens, part in meta.parts:
            out.index_copy_(0, tokens, _attend(query.index_select(0, tokens), k_cache, v_cache, part, scale))
        return out
    return _attend(query, k_cache, v_cache, meta, scale)


def _attend(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            scale: float) -> torch.Tensor:
    """`paged_attention` after the K/V write, for one batch of rows."""
    num_seqs, _, max_q, max_ctx = meta.attn_mask.shape
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[-2]
    group = num_heads // num_kv_heads
    uniform = query.shape[0] == num_seqs * max_q  # every sequence has max_q queries: no padding needed
    if uniform:
        q = query.view(num_seqs, max_q, num_heads, head_dim)
    else:
        q = query.new_zeros(num_seqs, max_q, num_heads, head_dim)
        q[meta.query_batch_idx, meta.query_offset] = query
    # GQA without copying K/V: the `group` query heads of each kv head become extra query rows of it,
    # [B, max_q, kv_heads * group, D] → [B, kv_heads, group * max_q, D], row g * max_q + t = (head g, token t).
    q = q.view(num_seqs, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(num_seqs, num_kv_heads, group * max_q, head_dim)
    mask = meta.grouped_mask(group)  # [B, 1, group * max_q, ctx]

    # Gather each sequence's context through its block table (one index_select over the flat block
    # dimension; advanced indexing of the 4-D pool costs several times more): [B, kv_heads, max_ctx, D].
    blocks = meta.block_tables.flatten()
    k = k_cache.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim)[:, :max_ctx].transpose(1, 2)
    v = v_cache.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim)[:, :max_ctx].transpose(1, 2)
    out = _sdpa(q, k, v, mask, scale)  # [B, kv_heads, group * max_q, D]
    out = out.view(num_seqs, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)  # [B, max_q, kv, g, D]
    out = out.reshape(num_seqs, max_q, num_heads, head_dim)
    return out.reshape(-1, num_heads, head_dim) if uniform else out[meta.query_batch_idx, meta.query_offset]


# cuDNN's attention (what SDPA picks on an H200 with torch 2.11) builds a plan per new shape: 1.65 ms of host time a
# call, 36 of the 54 ms of a TinyLlama-shaped bf16 decode step whose kernels took ~3.4 (scripts/profile_cuda_step.py).
# A paged pass's context length changes every step, so on CUDA attention runs on the other kernels.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    with sdpa_kernel(CUDA_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
