"""Ragged paged attention with per-request tree masks; dispatch between the Triton kernel, the CPU C
kernel and the torch reference (specd_kernels/backend.py: CUDA tensors -> Triton, CPU -> `ref.py`, unless
forced).

On the CPU a plan made with row_exact=True runs `cpu.c` instead (when a C compiler is found): every
row's bits then depend only on the keys it sees, which int8 needs for lossless speculation (see
cpu.py). Against ref.py's SDPA (2-core dev CPU, 2 threads each, 9 heads, 600 keys; measured before
the changes listed in cpu.c's header, which made cpu.c 1.2-1.6x faster again): decode batch 1 ~190
vs ~245 us, batch 16 ~1.7 vs ~2.2 ms, 8 verify rows ~0.55 vs ~0.33 ms, a 512-token prefill ~12 vs
~16 ms. Since those changes it is faster for fp32 models too (same-process A/B of whole fp32
forwards, default model: batch 1 at context 100 34.2 vs 37.1 ms, 8 verify rows at 600 56.4 vs 58.2,
16 decoding requests at 200 74.0 vs 87.7, a 256-token prompt 426 vs 470), so the engine plans it for
every fp32-activation model on the CPU (engine/model_runner.py).
"""
from __future__ import annotations

import torch

from specd_kernels import backend
from specd_kernels.attention import cpu, ref
from specd_kernels.attention.ref import MAX_BATCHED_Q_LEN, AttentionPlan

_TRITON = "specd_kernels.attention.triton"

__all__ = ["paged_attention", "plan_attention", "AttentionPlan", "MAX_BATCHED_Q_LEN"]


def _impl(tensor: torch.Tensor, row_exact: bool = False):
    if backend.use_triton(tensor):
        return backend.load(_TRITON)
    if row_exact and backend.get_backend() == "auto" and tensor.device.type == "cpu" and cpu.load() is not None:
        return cpu
    return ref


def plan_attention(
    cu_seqlens_q: torch.Tensor,  # [batch + 1] int32
    kv_lens: torch.Tensor,  # [batch] int32, after this step's K/V are stored
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    block_size: int,
    num_queries_per_kv: int,
    tree_mask: torch.Tensor | None = None,  # [sum of tree block sizes] bool
    cu_tree_mask: torch.Tensor | None = None,  # [batch + 1]
    row_exact: bool = False,
    prompt_rows: list[int] | None = None,  # [batch]: leading new rows that are prompt tokens (the C kernel's)
    hidden_keys: torch.Tensor | None = None,  # [batch, width] bool: the padded-KV baseline's padding (ref.py)
):
    """The step's attention plan for the backend its tensors go to (shared by all layers)."""
    impl = _impl(block_tables, row_exact)
    if impl is cpu:
        return impl.plan_attention(cu_seqlens_q, kv_lens, block_tables, block_size, num_queries_per_kv,
                                   tree_mask, cu_tree_mask, prompt_rows, hidden_keys)
    if impl is ref:
        return impl.plan_attention(cu_seqlens_q, kv_lens, block_tables, block_size, num_queries_per_kv,
                                   tree_mask, cu_tree_mask, hidden_keys)
    if hidden_keys is not None:  # a CPU benchmark baseline; the Triton kernel has no padded cache
        raise ValueError("hidden keys (--spec-layout padded-kv) need the CPU attention kernels")
    return impl.plan_attention(cu_seqlens_q, kv_lens, block_tables, block_size, num_queries_per_kv,
                               tree_mask, cu_tree_mask)


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [batch + 1] int32
    kv_lens: torch.Tensor,  # [batch] int32
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    scale: float,
    tree_mask: torch.Tensor | None = None,
    cu_tree_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    plan=None,
) -> torch.Tensor:
    """See specd_kernels/attention/ref.py for the contract; returns the attention output."""
    if plan is None:
        impl = _impl(q)
    else:
        impl = ref if isinstance(plan, AttentionPlan) else cpu if isinstance(plan, cpu.CpuPlan) else backend.load(_TRITON)
    return impl.paged_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale,
                                tree_mask, cu_tree_mask, out=out, plan=plan)
