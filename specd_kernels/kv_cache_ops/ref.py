"""KV cache writes in plain torch: the spec the Triton kernels are checked against, and the CPU path.

The paged cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]`; a token's flat
slot is `block_id * block_size + offset`. EMS-SD's unpadded KV cache needs only two writes: store
the step's new K/V by slot (rejected drafts are later overwritten in place), and copy the K/V of
an accepted tree path onto the slots right after the accepted prefix (`copy_slots`).
"""
from __future__ import annotations

import torch


def _flat(cache: torch.Tensor) -> torch.Tensor:
    # [num_blocks, block_size, num_kv_heads, head_dim] -> [num_slots, num_kv_heads, head_dim], a view
    return cache.view(-1, cache.shape[-2], cache.shape[-1])


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, distinct valid slots
) -> None:
    """Write token t's K/V into flat slot slot_mapping[t] of both caches (in place)."""
    _flat(k_cache).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    _flat(v_cache).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def copy_slots(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    src_slots: torch.Tensor,  # [num_copies] int64
    dst_slots: torch.Tensor,  # [num_copies] int64, distinct
) -> None:
    """Copy K/V from src_slots[i] to dst_slots[i] (in place).

    All sources are read before any destination is written, so a destination may be another
    copy's source (compacting a tree path moves slots down onto slots that are themselves moved).
    """
    if src_slots.numel() == 0:
        return
    for cache in (k_cache, v_cache):
        flat = _flat(cache)
        flat.index_copy_(0, dst_slots, flat.index_select(0, src_slots))
