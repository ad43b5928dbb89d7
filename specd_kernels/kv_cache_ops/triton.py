"""KV cache writes in Triton: the CUDA path of specd_kernels/kv_cache_ops (same contract as `ref.py`).

- `store_kv`: one program per new token writes its K and V rows (all KV heads) into its slot, in
  the cache's dtype. EMS-SD's unpadded cache needs nothing else per step: a request's tokens go to
  its own slots, and a rejected draft's slot is simply written again later.
- `copy_slots`: compacts an accepted tree path (its nodes' K/V move down to the slots right after
  the accepted prefix). Sources may be other copies' destinations, so every source is read before
  any destination is written: each program owns a slice of the row (KV heads x head_dim) for ALL
  copies, gathers the sources into a scratch buffer, waits at a barrier, then scatters. One launch
  per layer whatever the number of copies, and no race whatever their order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COPY_BLOCK_F = 256  # row elements per copy program
COPY_BLOCK_C = 16  # copies per inner iteration


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr, v_cache_ptr,  # [num_slots, num_kv_heads, head_dim] (a view of the paged cache)
    slot_mapping_ptr,  # [num_tokens] int64
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_slots_kernel(
    k_cache_ptr, v_cache_ptr,  # [num_slots, ROW] (each slot's row contiguous)
    src_ptr, dst_ptr,  # [num_copies] int64
    tmp_ptr,  # [2, num_copies, ROW] in the cache dtype
    num_copies, stride_cs,
    ROW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
):
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = offs_f < ROW
    tmp_v_ptr = tmp_ptr + num_copies * ROW
    for start in range(0, num_copies, BLOCK_C):  # gather every source first ...
        offs_c = start + tl.arange(0, BLOCK_C)
        mask = (offs_c < num_copies)[:, None] & f_mask[None, :]
        src = tl.load(src_ptr + offs_c, mask=offs_c < num_copies, other=0).to(tl.int64)
        at = src[:, None] * stride_cs + offs_f[None, :]
        tmp_at = offs_c.to(tl.int64)[:, None] * ROW + offs_f[None, :]
        tl.store(tmp_ptr + tmp_at, tl.load(k_cache_ptr + at, mask=mask), mask=mask)
        tl.store(tmp_v_ptr + tmp_at, tl.load(v_cache_ptr + at, mask=mask), mask=mask)
    tl.debug_barrier()  # ... then write: a destination may be another copy's source
    for start in range(0, num_copies, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        mask = (offs_c < num_copies)[:, None] & f_mask[None, :]
        dst = tl.load(dst_ptr + offs_c, mask=offs_c < num_copies, other=0).to(tl.int64)
        at = dst[:, None] * stride_cs + offs_f[None, :]
        tmp_at = offs_c.to(tl.int64)[:, None] * ROW + offs_f[None, :]
        tl.store(k_cache_ptr + at, tl.load(tmp_ptr + tmp_at, mask=mask), mask=mask)
        tl.store(v_cache_ptr + at, tl.load(tmp_v_ptr + tmp_at, mask=mask), mask=mask)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches: [num_blocks, block_size, kv_heads, head_dim]"
    assert k_cache.dtype in DTYPES and v_cache.dtype == k_cache.dtype
    assert k_cache.stride() == v_cache.stride()
    for cache in (k_cache, v_cache):
        # Slots must be uniformly strided for the flat slot view (block stride = block_size * slot stride).
        assert cache.stride(-1) == 1 and cache.stride(0) == cache.shape[1] * cache.stride(1), "cache not slot-flat"


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, distinct valid slots
) -> None:
    """Write token t's K/V into flat slot slot_mapping[t] of both caches (in place)."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and k.shape[1:] == k_cache.shape[2:], "k, v: [num_tokens, kv_heads, head_dim]"
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k.dtype in DTYPES and v.dtype in DTYPES
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64)
    assert len({t.device for t in (k, v, k_cache, v_cache, slot_mapping)}) == 1, "one device"
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )


def copy_slots(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    src_slots: torch.Tensor,  # [num_copies] int64
    dst_slots: torch.Tensor,  # [num_copies] int64, distinct
) -> None:
    """Copy K/V from src_slots[i] to dst_slots[i] (in place); all sources are read before any write."""
    _check_cache(k_cache, v_cache)
    assert src_slots.shape == dst_slots.shape and src_slots.dim() == 1
    assert src_slots.dtype in (torch.int32, torch.int64) and dst_slots.dtype in (torch.int32, torch.int64)
    assert len({t.device for t in (k_cache, v_cache, src_slots, dst_slots)}) == 1, "one device"
    num_copies = src_slots.numel()
    if num_copies == 0:
        return
    # Contiguous [kv_heads, head_dim] within a slot, so a slot is one row of ROW elements.
    assert k_cache.stride(2) == k_cache.shape[3] and k_cache.stride(1) == k_cache.shape[2] * k_cache.shape[3]
    row = k_cache.shape[2] * k_cache.shape[3]
    tmp = torch.empty(2, num_copies, row, dtype=k_cache.dtype, device=k_cache.device)
    _copy_slots_kernel[(triton.cdiv(row, COPY_BLOCK_F),)](
        k_cache, v_cache, src_slots, dst_slots, tmp, num_copies, k_cache.stride(1),
        ROW=row, BLOCK_C=COPY_BLOCK_C, BLOCK_F=COPY_BLOCK_F, num_warps=4,
    )
