"""Fixed-size KV blocks with reference counts, and per-sequence block tables.

Free order: a block whose last reference goes is appended to the back of the free queue and
allocation takes from the front, so the most recently freed blocks are reused last. A freed block
keeps its prefix-cache hash (if it has one): a cache hit takes it back out of the queue wherever it
sits, and allocation evicts it only when it reaches the front. The free queue order *is* the eviction
order: least recently freed first among blocks with ref count 0. A sequence's blocks are freed tail
first, so its last blocks (the least likely to be shared) are evicted before its first ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from helix_serve.engine.prefix_cache import CachedPrefix, PrefixCache, PrefixCacheStats

if TYPE_CHECKING:
    from helix_serve.engine.sequence import Sequence

NO_PREFIX = CachedPrefix([], 0, 0)


class NoFreeBlocksError(RuntimeError):
    """The pool has fewer free blocks than a request needs right now."""


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block is registered in the prefix cache
    draft_written: bool = False  # the draft's pool holds this block's K/V too (see prefix_cache.py)
    next_token: int | None = None  # the token after the block where its draft K/V were written (EAGLE: cached_prefix)


class BlockAllocator:
    """Hands out block ids from a fixed pool, takes them back when their last reference goes, and maps
    prefix-cache hashes to the blocks that hold them."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.blocks = [Block(i) for i in range(num_blocks)]
        # NOTE: an OrderedDict used as a queue: O(1) at both ends and O(1) removal of a cache hit.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks with ref count 0, cached ones included (allocation evicts them)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache, in use or free."""
        return len(self._cached)

    def free_order(self) -> list[int]:
        """The free queue, front (next allocated / evicted) first."""
        return list(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise NoFreeBlocksError("KV pool exhausted")
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        self._evict(block)
        block.ref_count = 1
        return block_id

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
        block.draft_written, block.next_token = False, None

    def share(self, block_id: int) -> None:
        """Add a reference: prefix sharing, or a cache hit on a freed block that still holds its hash."""
        block = self.blocks[block_id]
        if block.ref_count < 1:
            if block.block_hash is None:
                raise ValueError(f"block {block_id} is free and cannot be shared")
            del self._free[block_id]
        block.ref_count += 1

    def free(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count < 1:
            raise ValueError(f"block {block_id} freed twice")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Register a full block under its hash, unless it has one or another block holds this hash."""
        block = self.blocks[block_id]
        if block.block_hash is None and block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block_id

    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def prefer(self, block_id: int, block_hash: bytes) -> None:
        """This block's draft K/V is written: let it hold its hash in place of a block without them, so that a
        prefix first cached by a sequence the draft never followed becomes reusable by both models."""
        holder = self._cached.get(block_hash)
        block = self.blocks[block_id]
        if holder is not None and holder != block_id and block.block_hash is None \
                and not self.blocks[holder].draft_written:
            self.blocks[holder].block_hash = None
            block.block_hash, self._cached[block_hash] = block_hash, block_id


class BlockManager:
    """Grows, truncates and releases the block tables of sequences; reuses cached prefix blocks when
    `enable_prefix_caching` (`cache_key` names whatever else decides K/V content: the model pair, dtype)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False, cache_key: str = "",
                 draft_needs_features: bool = False):
        """draft_needs_features: the model proposer is an EAGLE head, whose K/V at a position is computed from the
        target's feature there (cached_prefix)."""
        self.block_size = block_size
        self.draft_needs_features = draft_needs_features
        # copies one block's K/V (every pool, every layer) into another: set by the engine, which owns the pools
        self.copy_block: Callable[[int, int], None] | None = None
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_cache = PrefixCache(self.allocator, block_size, cache_key) if enable_prefix_caching else None

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_blocks - self.allocator.num_free

    def ensure_slots(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` to hold `num_tokens`; all or nothing. False when the pool is short."""
        missing = self.blocks_for(num_tokens) - len(block_table)
        if missing > self.allocator.num_free:
            return False
        block_table.extend(self.allocator.allocate() for _ in range(max(missing, 0)))
        return True

    def cached_prefix(self, seq: Sequence) -> CachedPrefix:
        """The cached blocks a waiting sequence could start from (nothing is taken yet)."""
        prefix = self.prefix_cache.lookup(seq) if self.prefix_cache else NO_PREFIX
        if self.draft_needs_features and seq.drafts_by_model and prefix.block_ids:
            # An EAGLE head cannot catch up on a reused prefix (the target never computes its features there),
            # so for a sequence it may draft for only blocks with the head's K/V written count. The head's entry
            # at a block's last position also read the next token, the writer's: at the first block whose writer
            # read another token than this sequence's (n samples of one prompt read the same), reuse stops, and
            # that block is copied and its last position recomputed (target and head) in the copy, which costs one
            # token where dropping the block (vLLM's choice) costs a block of them.
            size, blocks = self.block_size, self.allocator.blocks
            keep = min(prefix.num_draft_tokens // size, len(prefix.block_ids))
            ids, tokens = prefix.block_ids, seq.token_ids
            first_differing = next((j for j in range(keep) if blocks[ids[j]].next_token != tokens[(j + 1) * size]),
                                   None)
            copy_last = first_differing is not None
            keep = first_differing + 1 if copy_last else keep
            reused = keep * size - copy_last
            prefix = CachedPrefix(prefix.block_ids[:keep], reused, reused, copy_last) if keep else NO_PREFIX
        return prefix

    def first_missing_block(self, seq: Sequence, prefix: CachedPrefix) -> bytes | None:
        """What the sequence would prefill first that the prefix cache could have held (None: nothing, or
        caching is off)."""
        return self.prefix_cache.first_missing_block(seq, prefix) if self.prefix_cache else None

    def admit(self, seq: Sequence, prefix: CachedPrefix) -> bool:
        """Give a waiting sequence (empty table) blocks for all its tokens: `prefix`'s cached blocks
        shared, new ones after them; all or nothing. The prefix counts as computed for the target, and
        for the draft as far as the draft has written it."""
        # NOTE: a cached block nobody uses sits in the free queue, so reusing it costs a free block too.
        reused_free = sum(self.allocator.blocks[b].ref_count == 0 for b in prefix.block_ids)
        missing = self.blocks_for(seq.num_tokens) - len(prefix.block_ids) + prefix.copy_last
        if missing + reused_free > self.allocator.num_free:
            return False
        blocks = list(prefix.block_ids)
        for block_id in blocks:
            self.allocator.share(block_id)  # the block to copy too: no allocation below may evict it first
        if prefix.copy_last:
            source, blocks[-1] = blocks[-1], self.allocator.allocate()
            self.copy_block(source, blocks[-1])
            self.allocator.free(source)
        seq.block_table.extend(blocks)
        self.ensure_slots(seq.block_table, seq.num_tokens)
        seq.num_target_cached, seq.num_draft_cached = prefix.num_tokens, prefix.num_draft_tokens
        # the reused blocks are registered, and draft-written as far as the prefix says (prefix_cache.py); a
        # copy is offered again once full (its hash is the original's, so it stays private)
        seq.num_registered_blocks = prefix.num_tokens // self.block_size
        seq.num_draft_written_blocks = prefix.num_draft_tokens // self.block_size
        if self.prefix_cache:
            self.prefix_cache.stats.record(seq.num_tokens, prefix.num_tokens)
        return True

    def reuse_draft_blocks(self, seq: Sequence) -> None:
        """Count as drafted the blocks past `seq.num_draft_cached` whose draft K/V a sharer has written since
        `seq` was admitted: n samples of one prompt are admitted before the first one's draft catches up."""
        if self.draft_needs_features:  # a head's entries need this sequence's own target features (cached_prefix)
            return
        size, blocks, table = self.block_size, self.allocator.blocks, seq.block_table
        i = seq.num_draft_cached // size
        while (i + 1) * size <= seq.num_target_cached and blocks[table[i]].draft_written:
            i += 1
        seq.num_draft_cached = max(seq.num_draft_cached, i * size)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """After a successful step: offer the sequence's newly verified full blocks to the prefix cache."""
        if self.prefix_cache:
            self.prefix_cache.register(seq)

    def prefix_cache_usage(self) -> dict[str, int]:
        """Blocks registered in the prefix cache (in use or free) and the tokens looked up / found there."""
        stats = self.prefix_cache.stats if self.prefix_cache else PrefixCacheStats()
        return {"cached_blocks": self.allocator.num_cached, "prefix_cache_queried_tokens": stats.num_queried_tokens,
                "prefix_cache_hit_tokens": stats.num_hit_tokens}

    def live_tokens(self, seqs: list[Sequence]) -> int:
        """Tokens whose target K/V the sequences' blocks hold, each shared block counted once."""
        live: dict[int, int] = {}  # block id -> tokens written in it
        for seq in seqs:
            num_tokens = seq.num_target_cached
            for i, block_id in enumerate(seq.block_table[: self.blocks_for(num_tokens)]):
                live[block_id] = max(live.get(block_id, 0), min(self.block_size, num_tokens - i * self.block_size))
        return sum(live.values())

    def truncate(self, block_table: list[int], num_tokens: int) -> None:
        """Drop the blocks past `num_tokens` (rollback of rejected draft tokens)."""
        keep = self.blocks_for(num_tokens)
        while len(block_table) > keep:
            self.allocator.free(block_table.pop())

    def release(self, block_table: list[int]) -> None:
        self.truncate(block_table, 0)
