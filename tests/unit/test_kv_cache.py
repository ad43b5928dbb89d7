"""KVCacheManager: block arithmetic at boundaries, all-or-nothing allocation, rollback, misuse."""
from __future__ import annotations

import pytest

from engine.kv_cache import KVCacheError, KVCacheManager
from engine.types import Request, SamplingParams


def make_request(request_id: str = "r", num_tokens: int = 1) -> Request:
    return Request(request_id, list(range(num_tokens)), num_tokens, SamplingParams())


def test_blocks_needed_at_boundaries():
    kv = KVCacheManager(num_blocks=8, block_size=16)
    assert [kv.blocks_needed(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_grows_at_block_boundaries_only():
    kv = KVCacheManager(num_blocks=8, block_size=16)
    r = make_request()
    assert kv.allocate(r, 1) and len(r.block_ids) == 1
    assert kv.allocate(r, 16) and len(r.block_ids) == 1
    assert kv.allocate(r, 17) and len(r.block_ids) == 2
    assert kv.allocate(r, 5) and len(r.block_ids) == 2  # never shrinks
    assert kv.num_free_blocks == 6
    assert kv.num_slots(r) == 32


def test_allocate_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = make_request("a"), make_request("b")
    assert kv.allocate(a, 12)  # 3 blocks
    assert not kv.allocate(b, 8)  # needs 2, 1 free
    assert b.block_ids == [] and kv.num_free_blocks == 1
    assert kv.allocate(b, 4)
    assert not kv.allocate(a, 13)  # exhausted
    assert len(a.block_ids) == 3 and kv.num_free_blocks == 0
    assert kv.usage == 1.0


def test_free_returns_everything_and_usage():
    kv = KVCacheManager(num_blocks=10, block_size=16)
    r = make_request()
    assert kv.usage == 0.0
    kv.allocate(r, 40)  # 3 blocks
    assert kv.usage == pytest.approx(0.3)
    kv.free(r)
    assert r.block_ids == [] and kv.num_free_blocks == 10 and kv.usage == 0.0


def test_rollback_keeps_blocks_of_the_kept_prefix():
    kv = KVCacheManager(num_blocks=8, block_size=16)
    r = make_request()
    kv.allocate(r, 50)  # 4 blocks
    kept = list(r.block_ids)
    kv.rollback(r, 33)  # positions 0..32 need 3 blocks
    assert r.block_ids == kept[:3] and kv.num_free_blocks == 5
    kv.rollback(r, 32)
    assert r.block_ids == kept[:2] and kv.num_free_blocks == 6
    kv.rollback(r, 32)  # idempotent
    assert r.block_ids == kept[:2]
    kv.rollback(r, 0)
    assert r.block_ids == [] and kv.num_free_blocks == 8


def test_slot_mapping():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = make_request("a"), make_request("b")
    kv.allocate(a, 4)
    kv.allocate(b, 4)
    kv.allocate(a, 8)  # a = [0, 2], b = [1]
    assert a.block_ids == [0, 2] and b.block_ids == [1]
    assert [kv.slot(a, p) for p in range(8)] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert kv.slot(b, 3) == 7
    with pytest.raises(IndexError):
        kv.slot(a, 8)


def test_freed_blocks_are_reused():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    for i in range(10):
        r = make_request(f"r{i}")
        assert kv.allocate(r, 8)
        kv.free(r)
    assert kv.num_free_blocks == 2


def test_double_free_raises():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r = make_request()
    kv.allocate(r, 8)
    blocks = list(r.block_ids)
    kv.free(r)
    r.block_ids = blocks  # a stale block table
    with pytest.raises(KVCacheError):
        kv.free(r)
    assert kv.num_free_blocks == 4


def test_duplicate_block_in_table_raises_and_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r = make_request()
    kv.allocate(r, 4)
    r.block_ids.append(r.block_ids[0])
    with pytest.raises(KVCacheError):
        kv.free(r)
    assert kv.num_free_blocks == 3


def test_foreign_block_raises():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = make_request("a"), make_request("b")
    kv.allocate(a, 4)
    b.block_ids = list(a.block_ids)
    with pytest.raises(KVCacheError):
        kv.free(b)
    b.block_ids = [99]
    with pytest.raises(KVCacheError):
        kv.free(b)
    b.block_ids = []
    kv.check_invariants([a, b])


def test_check_invariants_detects_leak():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r = make_request()
    kv.allocate(r, 8)
    kv.check_invariants([r])
    with pytest.raises(KVCacheError):
        kv.check_invariants([])


def test_bad_sizes_rejected():
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=0, block_size=16)
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=4, block_size=0)
