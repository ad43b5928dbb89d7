"""KV cache writes; dispatch between the Triton kernels and the torch reference (specd_kernels/backend.py:
CUDA tensors -> Triton, CPU -> `ref.py`, unless forced)."""
from __future__ import annotations

import torch

from specd_kernels import backend
from specd_kernels.kv_cache_ops import ref

_TRITON = "specd_kernels.kv_cache_ops.triton"

__all__ = ["store_kv", "copy_slots"]


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, distinct valid slots
) -> None:
    """Write token t's K/V into flat slot slot_mapping[t] of both caches (in place)."""
    impl = backend.load(_TRITON) if backend.use_triton(k_cache) else ref
    impl.store_kv(k, v, k_cache, v_cache, slot_mapping)


def copy_slots(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    src_slots: torch.Tensor,  # [num_copies] int64
    dst_slots: torch.Tensor,  # [num_copies] int64, distinct
) -> None:
    """Copy K/V from src_slots[i] to dst_slots[i] (in place); all sources are read before any write."""
    impl = backend.load(_TRITON) if backend.use_triton(k_cache) else ref
    impl.copy_slots(k_cache, v_cache, src_slots, dst_slots)
