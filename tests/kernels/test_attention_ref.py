"""specd_kernels/attention/ref.py and specd_kernels/kv_cache_ops/ref.py against naive dense per-request math."""
from __future__ import annotations

import math

import pytest
import torch

from specd_kernels.attention.ref import MAX_BATCHED_Q_LEN, paged_attention, plan_attention
from specd_kernels.kv_cache_ops import copy_slots, store_kv


def _random_tree(num_nodes: int, gen: torch.Generator) -> torch.Tensor:
    """Ancestor-or-self mask [num_nodes, num_nodes] of a random tree whose parents come earlier."""
    mask = torch.eye(num_nodes, dtype=torch.bool)
    for j in range(1, num_nodes):
        parent = int(torch.randint(0, j, (1,), generator=gen))
        mask[j] |= mask[parent]
    return mask


def _dense_reference(q, keys, values, q_lens, kv_lens, trees, scale):
    """Per request: full K/V, scores by hand, explicit visibility mask, softmax."""
    outs = []
    start = 0
    for i, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        qi = q[start : start + q_len].double()  # [q_len, H, D]
        start += q_len
        if q_len == 0:
            continue
        group = qi.shape[1] // keys[i].shape[1]
        k = keys[i].double().repeat_interleave(group, dim=1)  # [kv_len, H, D]
        v = values[i].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("jhd,khd->hjk", qi, k) * scale
        ctx = kv_len - q_len
        visible = torch.zeros(q_len, kv_len, dtype=torch.bool)
        visible[:, :ctx] = True
        visible[:, ctx:] = trees[i] if i in trees else torch.ones(q_len, q_len, dtype=torch.bool).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
        outs.append(torch.einsum("hjk,khd->jhd", scores.softmax(-1), v))
    return torch.cat(outs).float()


def _run_case(q_lens, kv_lens, num_kv_heads, group, head_dim, tree_ids=(), block_size=16, seed=0,
              first_block=None):
    """first_block: give the requests consecutive blocks from this id on instead of shuffled ones."""
    gen = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    batch = len(q_lens)
    blocks_per_req = [math.ceil(n / block_size) for n in kv_lens]
    num_blocks = sum(blocks_per_req) + 3
    # Garbage (finite) everywhere, then each request's true K/V written through shuffled blocks.
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen) * 5
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen) * 5
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    if first_block is not None:
        perm = [b % num_blocks for b in range(first_block, first_block + num_blocks)][::-1]
    max_blocks = max(blocks_per_req + [1]) + 1
    block_tables = torch.full((batch, max_blocks), -1, dtype=torch.int32)  # -1: unused entries
    keys, values = [], []
    for i, n in enumerate(kv_lens):
        ids = [perm.pop() for _ in range(blocks_per_req[i])]
        block_tables[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        pos = torch.arange(n)
        slots = torch.tensor(ids, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
        store_kv(k, v, k_cache, v_cache, slots)
        keys.append(k)
        values.append(v)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    trees = {i: _random_tree(q_lens[i], gen) for i in tree_ids}
    tree_mask = cu_tree = None
    if trees:
        sizes = [q_lens[i] ** 2 if i in trees else 0 for i in range(batch)]
        cu_tree = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
        tree_mask = torch.cat([trees[i].reshape(-1) for i in sorted(trees)])
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k_cache, v_cache, cu_q, torch.tensor(kv_lens, dtype=torch.int32), block_tables,
                    scale, tree_mask, cu_tree, out=out)
    expected = _dense_reference(q, keys, values, q_lens, kv_lens, trees, scale)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    # Without `out` (pure decode may return SDPA's own buffer instead of copying).
    fresh = paged_attention(q, k_cache, v_cache, cu_q, torch.tensor(kv_lens, dtype=torch.int32), block_tables,
                            scale, tree_mask, cu_tree)
    torch.testing.assert_close(fresh, out, atol=0, rtol=0)


SHAPES = [(1, 1, 64), (3, 3, 64), (2, 4, 16), (1, 3, 16)]  # (num_kv_heads, group, head_dim)

CASES = {
    # name: (q_lens, kv_lens, tree request ids)
    "decode_boundaries": ([1, 1, 1, 1, 1], [15, 16, 17, 32, 33], ()),
    "mixed_ragged": ([0, 1, 5, 40, 1, 17, 3], [10, 15, 16, 40, 33, 49, 3], ()),
    "prefill_only": ([33, 16], [33, 16], ()),
    "chunked_prefill": ([20, 17], [52, 17 + 16], ()),
    "zero_tokens_everywhere_but_one": ([0, 0, 2, 0], [5, 0, 18, 16], ()),
    "trees_short_and_long": ([1, 6, 24, 9], [15, 22, 57, 9], (1, 2, 3)),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"kv{s[0]}-g{s[1]}-d{s[2]}")
@pytest.mark.parametrize("case", sorted(CASES))
def test_paged_attention_matches_dense(case, shape):
    q_lens, kv_lens, tree_ids = CASES[case]
    _run_case(q_lens, kv_lens, *shape, tree_ids=tree_ids, seed=sum(map(ord, case)))


@pytest.mark.parametrize("seed", range(6))
def test_paged_attention_random_batches(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    batch = int(torch.randint(1, 9, (1,), generator=gen))
    q_lens, kv_lens, tree_ids = [], [], []
    for i in range(batch):
        q_len = int(torch.randint(0, 2 * MAX_BATCHED_Q_LEN + 4, (1,), generator=gen)) if i % 2 else int(torch.randint(0, 3, (1,), generator=gen))
        kv_len = q_len + int(torch.randint(0, 50, (1,), generator=gen))
        q_lens.append(q_len)
        kv_lens.append(kv_len)
        if q_len > 0 and torch.rand(1, generator=gen) < 0.4:
            tree_ids.append(i)
    if sum(q_lens) == 0:
        q_lens[0], kv_lens[0] = 1, kv_lens[0] + 1
    block_size = [4, 16, 5][seed % 3]
    _run_case(q_lens, kv_lens, 2, [1, 3, 4][seed % 3], 16, tuple(tree_ids), block_size=block_size, seed=seed)


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("first_block", [0, 2, 3, 4])  # 3: the view would overrun the cache
def test_single_request_in_consecutive_blocks(q_len, first_block):
    """One request in consecutive blocks reads its keys as a view of the cache (no gather); near the
    end of the cache, where the padded view would overrun it, it falls back to the gather."""
    kv_len = 40  # 3 blocks of 16, padded to 64 keys: from block 4 of 6 the view would overrun
    tables = torch.arange(first_block, first_block + 4, dtype=torch.int32)[None] % 6
    plan = plan_attention(torch.tensor([0, q_len], dtype=torch.int32), torch.tensor([kv_len], dtype=torch.int32),
                          tables, 16, 3)
    assert plan.batched.kv_first_slot == (first_block * 16 if first_block + 3 <= 6 else None)
    _run_case([q_len], [kv_len], 1, 3, 16, block_size=16, seed=first_block, first_block=first_block)


def test_plan_is_reusable_across_layers():
    """The runner plans once per step; a second layer's call with the plan must agree with planning anew."""
    gen = torch.Generator().manual_seed(7)
    k_cache = torch.randn(8, 16, 2, 16, generator=gen)
    v_cache = torch.randn(8, 16, 2, 16, generator=gen)
    q = torch.randn(21, 6, 16, generator=gen)
    cu_q = torch.tensor([0, 1, 21], dtype=torch.int32)
    kv_lens = torch.tensor([30, 40], dtype=torch.int32)
    tables = torch.tensor([[3, 5, 0], [1, 2, 7]], dtype=torch.int32)
    plan = plan_attention(cu_q, kv_lens, tables, 16, 3)
    a = paged_attention(q, k_cache, v_cache, cu_q, kv_lens, tables, 0.25, plan=plan)
    b = paged_attention(q, k_cache, v_cache, cu_q, kv_lens, tables, 0.25)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_store_kv_writes_only_its_slots():
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.full((6, 4, 2, 8), float("nan"))
    v_cache = torch.full((6, 4, 2, 8), float("nan"))
    slots = torch.randperm(24, generator=gen)[:9]
    k = torch.randn(9, 2, 8, generator=gen)
    v = torch.randn(9, 2, 8, generator=gen)
    store_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(24, 2, 8), v_cache.view(24, 2, 8)
    torch.testing.assert_close(flat_k[slots], k, atol=0, rtol=0)
    torch.testing.assert_close(flat_v[slots], v, atol=0, rtol=0)
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[slots] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


def test_copy_slots_overlapping_moves():
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.randn(4, 4, 1, 4, generator=gen)
    v_cache = torch.randn(4, 4, 1, 4, generator=gen)
    k0, v0 = k_cache.clone().view(16, 1, 4), v_cache.clone().view(16, 1, 4)
    # Compacting an accepted path: nodes at slots 7, 9, 12 move down onto 5, 6, 7 (7 is also a source).
    src = torch.tensor([7, 9, 12])
    dst = torch.tensor([5, 6, 7])
    copy_slots(k_cache, v_cache, src, dst)
    flat_k, flat_v = k_cache.view(16, 1, 4), v_cache.view(16, 1, 4)
    torch.testing.assert_close(flat_k[dst], k0[src], atol=0, rtol=0)
    torch.testing.assert_close(flat_v[dst], v0[src], atol=0, rtol=0)
    others = [i for i in range(16) if i not in (5, 6, 7)]
    torch.testing.assert_close(flat_k[others], k0[others], atol=0, rtol=0)
    copy_slots(k_cache, v_cache, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
