"""Automatic prefix caching: chained hashes of full blocks of verified tokens, lookup and registration.

A block's hash is sha256(parent block's hash ‖ its token ids), chained from a root hash of the cache
key (the model pair and dtype: whatever else decides the K/V). Equal hashes mean equal tokens at
equal positions after an equal prefix, hence equal K/V; the same tokens at another position or after
another prefix hash differently. The hash → block map and the eviction order live in the allocator.

What is cached, and when (`PrefixCache.register`, called after every successful step, visiting only the
blocks that became full since its last call: `Sequence.num_registered_blocks`, set at each admission):
- Target: only full blocks whose every position the target has written for the sequence's own tokens
  (positions < num_target_cached). Never a draft token, and never a block a rollback may still drop:
  rollback truncates to num_target_cached, which never goes below a registered block's end.
- Draft: its pool lags the target's, so a cached block's draft K/V may not exist yet.
  `Block.draft_written` says it does (set once a sequence's num_draft_cached has passed the block; a block
  whose hash another block without draft K/V holds — cached by a request the draft never followed — takes the
  hash over then, else an EAGLE engine, which reuses only blocks with the head's K/V, would never reuse it). A
  sequence that reuses a prefix starts its draft at the first reused block without draft K/V; the
  draft's catch-up pass writes that block, with the values any writer would write (same tokens, same
  positions, same prefix), so a sequence never reads draft K/V that nobody computed. An EAGLE head's entry at a
  block's last position also read the next token: `Block.next_token` keeps the writer's (block_manager.py,
  cached_prefix).
- A lookup never covers the last token: the engine needs its logits, so at most
  (num_tokens - 1) // block_size blocks are reused.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence as TokenIds
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from helix_serve.engine.block_manager import BlockAllocator
    from helix_serve.engine.sequence import Sequence


def root_hash(cache_key: str) -> bytes:
    """The parent hash of every sequence's first block."""
    return hashlib.sha256(b"helix-prefix-cache\0" + cache_key.encode()).digest()


def hash_block(parent_hash: bytes, token_ids: TokenIds[int]) -> bytes:
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """A lookup's result: the cached blocks a sequence can start from."""

    block_ids: list[int]
    num_tokens: int  # tokens the target reuses from them (all they hold, less one when copy_last)
    num_draft_tokens: int  # leading tokens whose draft K/V is reused too
    copy_last: bool = False  # the last block is copied, not shared: its last position is recomputed (EAGLE)


@dataclass(slots=True)
class PrefixCacheStats:
    """Tokens looked up and found, over every admission (re-admissions after preemption included)."""

    num_queried_tokens: int = 0
    num_hit_tokens: int = 0

    def record(self, num_queried: int, num_hit: int) -> None:
        self.num_queried_tokens += num_queried
        self.num_hit_tokens += num_hit


class PrefixCache:
    """Finds the longest cached prefix of a sequence and registers its newly verified full blocks."""

    def __init__(self, allocator: BlockAllocator, block_size: int, cache_key: str = ""):
        self.allocator = allocator
        self.block_size = block_size
        self.root = root_hash(cache_key)
        self.stats = PrefixCacheStats()

    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of the sequence's first `num_blocks` full blocks (kept on the sequence, grown lazily)."""
        self._grow_hashes(seq, num_blocks)
        return seq.block_hashes[:num_blocks]

    def _grow_hashes(self, seq: Sequence, num_blocks: int) -> None:
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else self.root, seq.token_ids[i * size : (i + 1) * size]))

    def lookup(self, seq: Sequence) -> CachedPrefix:
        block_ids: list[int] = []
        for block_hash in self.block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block_id = self.allocator.lookup(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        num_draft = next((i for i, b in enumerate(block_ids) if not self.allocator.blocks[b].draft_written),
                         len(block_ids))
        return CachedPrefix(block_ids, len(block_ids) * self.block_size, num_draft * self.block_size)

    def first_missing_block(self, seq: Sequence, prefix: CachedPrefix) -> bytes | None:
        """The hash of the first full block a lookup could cover but did not find (None: there is none)."""
        i = len(prefix.block_ids)
        return self.block_hashes(seq, i + 1)[i] if i < (seq.num_tokens - 1) // self.block_size else None

    def register(self, seq: Sequence) -> None:
        """Cache the full blocks of verified tokens; mark those whose draft K/V is written too. Only the
        blocks that became full since the last call are visited (the counts restart at each admission)."""
        num_verified = min(seq.num_target_cached, seq.num_tokens) // self.block_size
        self._grow_hashes(seq, num_verified)
        # NOTE: offered once: a block whose hash another block holds stays private, even if that one is
        # evicted later (retrying such blocks every step would cost O(history) again).
        for i in range(seq.num_registered_blocks, num_verified):
            self.allocator.cache(seq.block_table[i], seq.block_hashes[i])
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_verified)
        num_drafted = min(seq.num_draft_cached, seq.num_target_cached, seq.num_tokens) // self.block_size
        for i in range(seq.num_draft_written_blocks, num_drafted):
            block = self.allocator.blocks[seq.block_table[i]]
            end = (i + 1) * self.block_size
            block.draft_written, block.next_token = True, seq.token_ids[end] if end < seq.num_tokens else None
            self.allocator.prefer(seq.block_table[i], seq.block_hashes[i])
        seq.num_draft_written_blocks = max(seq.num_draft_written_blocks, num_drafted)
