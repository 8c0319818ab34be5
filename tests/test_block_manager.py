"""Allocator and block-table bookkeeping: exact ids, reference counts and free order."""

import pytest

from helix_serve.engine.block_manager import BlockAllocator, BlockManager, NoFreeBlocksError


def test_allocate_takes_lowest_ids_first_and_free_appends_to_the_back():
    alloc = BlockAllocator(4)
    assert [alloc.allocate() for _ in range(3)] == [0, 1, 2]
    alloc.free(1)
    alloc.free(0)
    assert alloc.num_free == 3
    assert [alloc.allocate() for _ in range(3)] == [3, 1, 0]
    with pytest.raises(NoFreeBlocksError):
        alloc.allocate()


def test_reference_counts():
    alloc = BlockAllocator(2)
    b = alloc.allocate()
    alloc.share(b)
    assert alloc.blocks[b].ref_count == 2
    alloc.free(b)
    assert alloc.num_free == 1 and alloc.blocks[b].ref_count == 1
    alloc.free(b)
    assert alloc.num_free == 2 and alloc.blocks[b].ref_count == 0
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free(b)
    with pytest.raises(ValueError, match="is free"):
        alloc.share(b)


def test_ensure_slots_is_all_or_nothing_and_truncate_rolls_back():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    assert bm.ensure_slots(table, 9)  # 3 blocks
    assert table == [0, 1, 2]
    other: list[int] = []
    assert not bm.ensure_slots(other, 8)  # needs 2, only 1 free: nothing taken
    assert other == [] and bm.num_free_blocks == 1
    bm.truncate(table, 5)  # rejected drafts: keep 2 blocks, the tail block goes back
    assert table == [0, 1] and bm.num_free_blocks == 2
    bm.release(table)
    assert table == [] and bm.num_free_blocks == 4
    # released tail-first, so the next allocation order is 3, 2, 1, 0
    assert [bm.allocator.allocate() for _ in range(4)] == [3, 2, 1, 0]


def test_free_queue_is_the_eviction_order_of_cached_blocks():
    alloc = BlockAllocator(4)
    assert [alloc.allocate() for _ in range(4)] == [0, 1, 2, 3]
    for b in range(4):
        alloc.cache(b, bytes([b]))
    for b in (2, 0, 3, 1):
        alloc.free(b)
    assert alloc.free_order() == [2, 0, 3, 1] and alloc.num_free == 4 and alloc.num_cached == 4
    alloc.share(alloc.lookup(bytes([0])))  # a hit on a freed cached block takes it out of the queue
    assert alloc.free_order() == [2, 3, 1] and alloc.blocks[0].ref_count == 1
    assert alloc.allocate() == 2  # least recently freed: evicted, its hash forgotten
    assert alloc.lookup(bytes([2])) is None and alloc.blocks[2].block_hash is None and alloc.num_cached == 3
    alloc.free(0)  # back to the tail, still cached
    assert alloc.free_order() == [3, 1, 0] and alloc.lookup(bytes([0])) == 0
    assert [alloc.allocate() for _ in range(3)] == [3, 1, 0] and alloc.num_cached == 0


def test_a_hash_keeps_its_first_block_and_a_block_its_first_hash():
    alloc = BlockAllocator(3)
    a, b = alloc.allocate(), alloc.allocate()
    alloc.cache(a, b"h")
    alloc.cache(b, b"h")  # same content computed twice: the second copy stays private
    alloc.cache(a, b"other")
    assert alloc.lookup(b"h") == a and alloc.blocks[b].block_hash is None and alloc.blocks[a].block_hash == b"h"
    alloc.free(b)
    assert alloc.allocate() == 2 and alloc.allocate() == b  # uncached: nothing to keep


def test_eviction_resets_the_draft_mark():
    alloc = BlockAllocator(1)
    b = alloc.allocate()
    alloc.cache(b, b"h")
    alloc.blocks[b].draft_written = True
    alloc.free(b)
    assert alloc.allocate() == b and not alloc.blocks[b].draft_written and alloc.num_cached == 0
