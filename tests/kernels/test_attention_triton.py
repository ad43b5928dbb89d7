"""specd_kernels/attention/triton.py against the torch reference (itself checked against dense math in
test_attention_ref.py): ragged batches mixing 0, 1 and many new tokens, block-boundary lengths,
GQA ratios, trees up to 128 new tokens, split-KV, every dtype; outputs are NaN-poisoned first."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from specd_kernels import attention  # noqa: E402
from specd_kernels.attention import ref  # noqa: E402
from tests.kernels.paged import make_batch  # noqa: E402

TOLERANCE = {  # vs an fp32 reference on the same (rounded) inputs; low precision rounds p and the output
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def check(batch, num_splits=None):
    """Triton through the dispatch (forced) into a poisoned `out`, against the reference."""
    out = torch.full_like(batch.q, float("nan"))
    plan = None
    if num_splits is not None:
        from specd_kernels.attention import triton as triton_attention
        plan = triton_attention.plan_attention(batch.cu_seqlens_q, batch.kv_lens, batch.block_tables,
                                               batch.k_cache.shape[1], batch.q.shape[1] // batch.k_cache.shape[2],
                                               batch.tree_mask, batch.cu_tree_mask, num_splits=num_splits)
    result = attention.paged_attention(*batch.args(), out=out, plan=plan)
    assert result is out
    expected = ref.paged_attention(*batch.to_float().args())
    assert not out.isnan().any(), "an output element was never written"
    torch.testing.assert_close(out.float().cpu(), expected, **TOLERANCE[batch.q.dtype])


CASES = {
    # name: (q_lens, kv_lens, tree request ids, block_size)
    "decode_block_boundaries": ([1, 1, 1, 1, 1, 1], [1, 15, 16, 17, 32, 33], (), 16),
    "mixed_0_1_many": ([0, 1, 5, 40, 1, 17, 0, 3], [10, 15, 16, 40, 33, 49, 7, 3], (), 16),
    "chunked_prefill": ([20, 17], [52, 33], (), 16),
    "verify_trees": ([1, 9, 9, 4], [15, 24, 40, 9], (1, 2), 16),
    "odd_page_size_trees": ([1, 6, 24, 9], [15, 22, 57, 9], (1, 2, 3), 5),
}
SHAPES = [(1, 1, 64), (3, 3, 64), (2, 4, 128), (1, 8, 64)]  # (num_kv_heads, group, head_dim)


@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"kv{s[0]}-g{s[1]}-d{s[2]}")
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_fp32(case, shape, device):
    q_lens, kv_lens, trees, block_size = CASES[case]
    check(make_batch(q_lens, kv_lens, *shape, trees, block_size, seed=len(case) * 7 + shape[1], device=device))


@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_low_precision(dtype, head_dim, device):
    q_lens, kv_lens, trees, block_size = ([0, 1, 6, 24, 1], [4, 15, 22, 57, 33], (2, 3), 16)
    check(make_batch(q_lens, kv_lens, 2, 4, head_dim, trees, block_size, seed=head_dim, dtype=dtype, device=device))


@pytest.mark.usefixtures("force_triton")
def test_tree_of_128_new_tokens(device):
    """A verify step at the tree-size limit next to a decode and a plain chunk."""
    check(make_batch([128, 1, 30], [300, 77, 30], 2, 2, 64, (0,), 16, seed=5, device=device))


@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("num_splits", [1, 2, 8])
def test_split_kv_long_context(num_splits, device):
    """Flash-decoding path: contexts up to 4k at batch 3, with a short verify tree and an empty request."""
    batch = make_batch([1, 0, 5, 1], [4096, 3, 1500, 2], 2, 4, 64, (2,), 16, seed=num_splits, device=device)
    check(batch, num_splits=num_splits)


@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("seed", range(3))
def test_random_batches(seed, device):
    gen = torch.Generator().manual_seed(1000 + seed)
    q_lens, kv_lens, trees = [], [], []
    for i in range(int(torch.randint(1, 7, (1,), generator=gen))):
        q_len = int(torch.randint(0, 3 if i % 2 else 40, (1,), generator=gen))
        q_lens.append(q_len)
        kv_lens.append(q_len + int(torch.randint(0, 70, (1,), generator=gen)))
        if q_len > 1 and torch.rand(1, generator=gen) < 0.5:
            trees.append(i)
    if sum(q_lens) == 0:
        q_lens[0], kv_lens[0] = 1, kv_lens[0] + 1
    check(make_batch(q_lens, kv_lens, 2, [1, 3, 4][seed], 64, tuple(trees), [16, 8, 7][seed], seed=seed,
                     device=device))


def test_dispatch_follows_the_plan(device, force_triton):
    """A Triton plan runs Triton whatever the backend says later; a reference plan runs the reference."""
    batch = make_batch([3, 1], [20, 9], 1, 2, 64, (0,), 16, seed=3, device=device)
    plan = attention.plan_attention(batch.cu_seqlens_q, batch.kv_lens, batch.block_tables, 16, 2,
                                    batch.tree_mask, batch.cu_tree_mask)
    assert not isinstance(plan, ref.AttentionPlan)
    expected = ref.paged_attention(*batch.to_float().args())
    for _ in range(2):  # the plan is reusable across layers
        out = attention.paged_attention(*batch.args(), plan=plan)
        torch.testing.assert_close(out.float().cpu(), expected, **TOLERANCE[torch.float32])


def test_launcher_rejects_bad_inputs(device, force_triton):
    batch = make_batch([2], [5], 1, 2, 64, seed=0, device=device)
    q, k, v, cu, kv, bt, scale, _, _ = batch.args()
    with pytest.raises(AssertionError):
        attention.paged_attention(q.to(torch.float16), k, v, cu, kv, bt, scale)  # mixed dtypes
    with pytest.raises(AssertionError):
        attention.paged_attention(q, k, v, cu.long(), kv, bt, scale)  # int64 offsets
    with pytest.raises(AssertionError):
        attention.paged_attention(q[..., :32], k, v, cu, kv, bt, scale)  # head_dim differs from the cache's
    with pytest.raises(AssertionError):
        attention.paged_attention(q, k, v, cu, kv, bt.long(), scale)  # int64 block tables
    with pytest.raises(ValueError):
        attention.paged_attention(q, k, v, cu, kv - 4, bt, scale)  # fewer keys than new tokens
