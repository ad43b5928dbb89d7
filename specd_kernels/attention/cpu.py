"""CPU attention through `cpu.c`: one C call per layer for every request of the step.

`cpu.c` computes every (row, head) over exactly the keys it sees, in cache order, so a token's
attention output has the same bits as a decode row, as a verified draft row, alone or in any batch,
and a prompt token's (the plan's prompt_rows) the same bits in a prompt chunk of any size. With int8
(whose activation rounding turns a last-bit difference into a visible one) that is what keeps
speculation and batching lossless; the torch reference's
SDPA cannot promise it, as its matmuls pick kernels by row count.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from specd_kernels.attention import ref
from specd_kernels.cbuild import F32, F32P, I32P, I64, I64P, U8P, load as _load
from specd_kernels.rope.cpu import kv_half_supported  # the same specd_kernels/half.h, built with the same flags

SOURCE = Path(__file__).with_name("cpu.c")
SIGNATURES = (
    ("paged_attention_rows",
     (F32P, I64, F32P, F32P, I32P, I32P, I32P, I64, I64P, I64, I64, I64, I64, I64, F32, U8P, I64P, I32P, U8P, I64,
      F32P, I64, I64),
     ctypes.c_int),
)


def load():
    return _load(SOURCE, SIGNATURES)


@dataclass
class CpuPlan:
    """The step's layout as the C kernel reads it (built once per step, shared by all layers)."""

    req_ids: torch.Tensor  # [n] int64 requests with at least one new row
    cu_seqlens_q: torch.Tensor  # [batch + 1] int32 contiguous
    kv_lens: torch.Tensor  # [batch] int32 contiguous
    block_tables: torch.Tensor  # [batch, max_blocks] int32 contiguous
    tree_mask: torch.Tensor | None  # uint8 view of the flat bool tree masks
    cu_tree_mask: torch.Tensor | None  # [batch + 1] int64
    prompt_rows: torch.Tensor | None = None  # [batch] int32: leading new rows that are prompt tokens
    hidden_keys: torch.Tensor | None = None  # [batch, width] uint8: context keys no row of the request sees


def plan_attention(cu_seqlens_q, kv_lens, block_tables, block_size, num_queries_per_kv, tree_mask=None,
                   cu_tree_mask=None, prompt_rows=None, hidden_keys=None) -> CpuPlan:
    """prompt_rows ([batch] ints, or None): how many of each request's leading new rows are prompt
    tokens. cpu.c gives those rows their own faster arithmetic where it can (AVX-512): a prompt row's
    bits then differ from a decoded token's, but never depend on the chunk or batch it came in.
    hidden_keys: as in ref.py (its module docstring); a request with hidden keys has no prompt rows."""
    cu_q, kv = cu_seqlens_q.tolist(), kv_lens.tolist()
    cu_tree = cu_tree_mask.tolist() if cu_tree_mask is not None else None
    req_ids = []
    for i, (q_len, kv_len) in enumerate(zip((b - a for a, b in zip(cu_q, cu_q[1:])), kv)):
        if q_len < 0 or kv_len < q_len:
            raise ValueError(f"bad lengths: q_len {q_len}, kv_len {kv_len}")
        if q_len and cu_tree is not None:
            numel = cu_tree[i + 1] - cu_tree[i]
            if numel not in (0, q_len * q_len):
                raise ValueError(f"tree block {i} has {numel} entries, expected {q_len}^2")
        if q_len:
            req_ids.append(i)
    trees = cu_trees = None
    if tree_mask is not None:
        trees = tree_mask.to(torch.bool).contiguous().view(torch.uint8)
        cu_trees = cu_tree_mask.to(torch.int64).contiguous()
    prompts = None if prompt_rows is None else torch.as_tensor(prompt_rows, dtype=torch.int32).contiguous()
    hidden = None
    if hidden_keys is not None:
        hidden = ref.check_hidden_keys(hidden_keys, kv, prompt_rows).to(torch.uint8).contiguous()
    return CpuPlan(torch.tensor(req_ids, dtype=torch.int64), cu_seqlens_q.to(torch.int32).contiguous(),
                   kv_lens.to(torch.int32).contiguous(), block_tables.to(torch.int32).contiguous(), trees, cu_trees,
                   prompts, hidden)


def paged_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale, tree_mask=None,
                    cu_tree_mask=None, out=None, plan: CpuPlan | None = None) -> torch.Tensor:
    """Same contract as ref.paged_attention, for fp32 CPU tensors."""
    # q may be a view into the fused qkv projection: rows strided, heads and dims packed.
    q_packed = q.stride(2) == 1 and q.stride(1) == q.shape[2]
    # cpu.c converts each fp16 key it reads, exactly (with F16C; without it the reference runs)
    kv_half = k_cache.dtype == v_cache.dtype == torch.float16 and kv_half_supported()
    if not (q_packed and q.dtype == torch.float32 and (kv_half or k_cache.dtype == v_cache.dtype == torch.float32)
            and k_cache.is_contiguous() and v_cache.is_contiguous()):
        # bf16/fp16 activations on a CPU (rare): the reference, planned afresh
        return ref.paged_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale, tree_mask,
                                   cu_tree_mask, out=out, hidden_keys=None if plan is None else plan.hidden_keys)
    if plan is None:
        plan = plan_attention(cu_seqlens_q, kv_lens, block_tables, k_cache.shape[1],
                              q.shape[1] // k_cache.shape[2], tree_mask, cu_tree_mask)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype)
    assert out.is_contiguous() and out.shape == q.shape
    if plan.req_ids.numel() == 0:
        return out
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    status = load().paged_attention_rows(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), plan.cu_seqlens_q.data_ptr(),
        plan.kv_lens.data_ptr(), plan.block_tables.data_ptr(), plan.block_tables.shape[1],
        plan.req_ids.data_ptr(), plan.req_ids.numel(), q.shape[1], num_kv_heads, head_dim, block_size,
        scale, None if plan.tree_mask is None else plan.tree_mask.data_ptr(),
        None if plan.cu_tree_mask is None else plan.cu_tree_mask.data_ptr(),
        None if plan.prompt_rows is None else plan.prompt_rows.data_ptr(),
        None if plan.hidden_keys is None else plan.hidden_keys.data_ptr(),
        0 if plan.hidden_keys is None else plan.hidden_keys.shape[1], out.data_ptr(), torch.get_num_threads(), kv_half)
    if status != 0:
        raise MemoryError("C attention could not allocate its buffers (or an fp16 cache without F16C)")
    return out
