"""Rotary position embedding and the K/V store of a decoder layer, in plain torch: the spec `cpu.c`
follows, and the path for CUDA tensors (whose store is the Triton kernel of specd_kernels/kv_cache_ops).

The fused projection's output row is [q heads | k heads | v heads]. q and k are rotated (HF's
"default" rope with rotate_half), then token t's k and v go into flat cache slot slot_mapping[t].
"""
from __future__ import annotations

import torch

from specd_kernels.kv_cache_ops import store_kv


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x # [num_tokens, num_heads, head_dim]; cos, sin # [num_tokens, 1, head_dim], sin sign-folded:
    rotate_half(x) * sin == flip_halves(x) * [-sin_lo, sin_hi] (one flip instead of slices, neg, cat)."""
    num_tokens, num_heads, head_dim = x.shape
    flipped = x.reshape(num_tokens, num_heads, 2, head_dim // 2).flip(2).view(num_tokens, num_heads, head_dim)
    return x * cos + flipped * sin  # two rounded products, then the sum: HF's arithmetic


def rotate_and_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                     num_kv_heads: int) -> torch.Tensor:
    """qkv # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]; cos, sin # [num_tokens, head_dim]
    (rows of the tables at each token's position). Returns the rotated q # [num_tokens, num_heads,
    head_dim]; the rotated k and the v are stored in the caches."""
    num_tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
    num_qk = (num_heads + num_kv_heads) * head_dim
    qk = apply_rope(qkv[:, :num_qk].view(num_tokens, num_heads + num_kv_heads, head_dim), cos.unsqueeze(1),
                    sin.unsqueeze(1))
    v = qkv[:, num_qk:].view(num_tokens, num_kv_heads, head_dim)
    store_kv(qk[:, num_heads:], v, k_cache, v_cache, slot_mapping)
    return qk[:, :num_heads]
