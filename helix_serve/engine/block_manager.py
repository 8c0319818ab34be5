"""Fixed-size KV blocks with reference counts, and per-sequence block tables.

Free order: a freed block goes to the back of the free queue and allocation takes from the front, so
the most recently freed blocks are reused last (the order prefix caching will want for eviction).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class NoFreeBlocksError(RuntimeError):
    """The pool has fewer free blocks than a request needs right now."""


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0


class BlockAllocator:
    """Hands out block ids from a fixed pool and takes them back when their last reference goes."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise NoFreeBlocksError("KV pool exhausted")
        block = self.blocks[self._free.popleft()]
        block.ref_count = 1
        return block.block_id

    def share(self, block_id: int) -> None:
        """Add a reference (prefix sharing)."""
        block = self.blocks[block_id]
        if block.ref_count < 1:
            raise ValueError(f"block {block_id} is free and cannot be shared")
        block.ref_count += 1

    def free(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count < 1:
            raise ValueError(f"block {block_id} freed twice")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free.append(block_id)


class BlockManager:
    """Grows, truncates and releases the block tables of sequences."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

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

    def truncate(self, block_table: list[int], num_tokens: int) -> None:
        """Drop the blocks past `num_tokens` (rollback of rejected draft tokens)."""
        keep = self.blocks_for(num_tokens)
        while len(block_table) > keep:
            self.allocator.free(block_table.pop())

    def release(self, block_table: list[int]) -> None:
        self.truncate(block_table, 0)
