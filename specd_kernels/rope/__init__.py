"""Rotary embedding + K/V store of a decoder layer. On the CPU, one C call (`cpu.c`, built on first
use) replaces about ten small torch ops per layer (3-9 us of dispatch each at batch 1); elsewhere, when
a backend is forced ("ref" or "triton", specd_kernels/backend.py) or without a C compiler, `ref.py`."""
from __future__ import annotations

import torch

from specd_kernels import backend
from specd_kernels.rope import ref
from specd_kernels.rope.ref import apply_rope

__all__ = ["apply_rope", "rotate_and_store"]

KV_DTYPES = (torch.float32, torch.float16)  # the C path's caches (fp16 where the CPU has F16C: cpu.c)


def _c_library(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    # Only under "auto": a forced "triton" or "ref" must reach that backend's store_kv (ref.py's path).
    if backend.get_backend() != "auto" or qkv.device.type != "cpu" or qkv.stride(1) != 1:
        return None
    if qkv.dtype != torch.float32 or k_cache.dtype != v_cache.dtype or k_cache.dtype not in KV_DTYPES:
        return None
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    from specd_kernels.rope import cpu

    if k_cache.dtype == torch.float16 and not cpu.kv_half_supported():
        return None  # no F16C: the reference stores fp16
    return cpu.load()


def rotate_and_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                     num_kv_heads: int) -> torch.Tensor:
    """ref.rotate_and_store's contract; on the C path q is rotated in place and returned as a view
    of qkv (the attention kernels take its strided rows)."""
    lib = _c_library(qkv, k_cache, v_cache)
    if lib is None:
        return ref.rotate_and_store(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)
    num_tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim and k_cache.shape[-2] == num_kv_heads
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == (num_tokens, head_dim) == sin.shape
    assert cos.dtype == sin.dtype == torch.float32
    slots = slot_mapping if slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous() \
        else slot_mapping.to(torch.int64).contiguous()
    assert slots.shape == (num_tokens,)
    if lib.rotate_and_store(qkv.data_ptr(), num_tokens, qkv.stride(0), cos.data_ptr(), sin.data_ptr(), num_heads,
                            num_kv_heads, head_dim, k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
                            k_cache.numel() // (num_kv_heads * head_dim), k_cache.dtype == torch.float16) != 0:
        raise ValueError(f"C rope: head_dim {head_dim} unsupported (even, at most 512), a slot out of range "
                         "or an fp16 cache without F16C")
    return qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
