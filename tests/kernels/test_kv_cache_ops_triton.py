"""specd_kernels/kv_cache_ops/triton.py against the reference: stores by slot mapping (with dtype casts
and strided inputs) and accepted-path compaction whose sources overlap their destinations."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from specd_kernels import backend, kv_cache_ops  # noqa: E402
from specd_kernels.kv_cache_ops import ref  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(2)]


@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(16, 3, 64), (5, 2, 128), (16, 1, 16)], ids=str)
def test_store_kv_matches_reference(dtype, shape, device):
    block_size, num_kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(block_size + head_dim)
    num_slots = 7 * block_size
    k_cache, v_cache = _caches(7, block_size, num_kv_heads, head_dim, dtype, device, seed=1)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_slots, generator=gen)[:19].to(device)  # block-boundary slots included at random
    # fp32 activations into a low-precision cache, through a strided view (q, k, v split out of one qkv row).
    qkv = torch.randn(19, 3 * num_kv_heads, head_dim, generator=gen).to(device)
    k, v = qkv[:, num_kv_heads:2 * num_kv_heads], qkv[:, 2 * num_kv_heads:]
    kv_cache_ops.store_kv(k, v, k_cache, v_cache, slots)
    ref.store_kv(k, v, k_ref, v_ref, slots)
    # Bit-exact, except that Triton's interpreter rounds fp32 -> bf16 by truncation (GPUs round to
    # nearest even, as torch does): one bf16 ulp there.
    tol = dict(atol=0, rtol=2 ** -7) if dtype == torch.bfloat16 and device == "cpu" else dict(atol=0, rtol=0)
    torch.testing.assert_close(k_cache, k_ref, **tol)
    torch.testing.assert_close(v_cache, v_ref, **tol)


@pytest.mark.usefixtures("force_triton")
def test_store_kv_writes_only_its_slots(device):
    k_cache = torch.full((6, 4, 2, 16), float("nan"), device=device)
    v_cache = torch.full((6, 4, 2, 16), float("nan"), device=device)
    slots = torch.tensor([3, 4, 23, 0], device=device)  # block ends and starts
    k = torch.randn(4, 2, 16, device=device)
    v = torch.randn(4, 2, 16, device=device)
    kv_cache_ops.store_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(24, 2, 16), v_cache.view(24, 2, 16)
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    untouched = torch.ones(24, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()
    kv_cache_ops.store_kv(k[:0], v[:0], k_cache, v_cache, slots[:0])  # an empty step


@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_slots_compacts_accepted_paths(dtype, device):
    """Two requests' accepted tree paths move down onto the slots after their prefixes; several
    destinations are themselves sources of other copies (read-before-write across the whole call)."""
    k_cache, v_cache = _caches(6, 16, 3, 64, dtype, device, seed=2)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    # Request A: base 10, path nodes (2, 5, 6, 9) -> slots 12,15,16,19 onto 10..13.
    # Request B: base 40, path nodes (1, 3) -> 41, 43 onto 40, 41 (41 is both).
    src = torch.tensor([12, 15, 16, 19, 41, 43], device=device)
    dst = torch.tensor([10, 11, 12, 13, 40, 41], device=device)
    kv_cache_ops.copy_slots(k_cache, v_cache, src, dst)
    ref.copy_slots(k_ref, v_ref, src, dst)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.usefixtures("force_triton")
def test_copy_slots_permutation_and_many_copies(device):
    """A cyclic permutation over more copies than one inner block: any order must read before writing."""
    k_cache, v_cache = _caches(8, 8, 2, 64, torch.float32, device, seed=3)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    gen = torch.Generator().manual_seed(4)
    dst = torch.randperm(64, generator=gen)[:37]
    src = dst.roll(1)
    src, dst = src.to(device), dst.to(device)
    kv_cache_ops.copy_slots(k_cache, v_cache, src, dst)
    ref.copy_slots(k_ref, v_ref, src, dst)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    empty = torch.tensor([], dtype=torch.long, device=device)
    kv_cache_ops.copy_slots(k_cache, v_cache, empty, empty)


def test_cpu_tensors_use_the_reference_by_default(monkeypatch):
    """Under "auto" a CPU cache never reaches Triton (the engine's CPU path imports no kernel)."""
    assert backend.get_backend() == "auto"
    assert not backend.use_triton(torch.zeros(1))
    monkeypatch.setattr(backend, "_backend", "ref")
    assert not backend.use_triton(torch.zeros(1))
    monkeypatch.setattr(backend, "_backend", "triton")
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.use_triton(torch.zeros(1))
    with pytest.raises(ValueError):
        backend.set_backend("cuda")
