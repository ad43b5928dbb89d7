"""Ragged paged attention with per-request tree masks in Triton: the CUDA path of specd_kernels/attention.

Same conventions as `ref.py` (read its docstring): a flat ragged query batch (`cu_seqlens_q`), K/V
read through block tables from the paged cache, `kv_lens` counted after this step's K/V were stored,
causal within each request or, for requests with a tree block, the tree mask over their new tokens
(EMS-SD's unpadded inputs and unpadded KV cache: no request is padded to another's length).

One kernel serves prefill chunks, decode and verification. A program owns BLOCK_Q new tokens of one
request times the GROUP query heads that share one KV head (GQA), so each K/V tile read from the
cache feeds BLOCK_Q * GROUP query rows: decode at GQA ratio 4 fills a 16-row tensor-core tile with
one token's 4 heads (x 4 tokens of a verify step) instead of wasting 15 of 16 rows. Softmax is online
(FlashAttention-2), in base 2 with the scale folded in. Tiles of keys every query of the program
sees (the context) skip all masking; only the tiles that overlap the new tokens build a mask.
Programs find their request by binary search over `cu_seqlens_q` (as vLLM's unified Triton
attention does), so launching needs no per-step host-side index arrays and no device sync.

Split-KV (flash-decoding, Dao et al. 2023): at small batch and long context the grid gets a third
axis; each split attends a contiguous range of key tiles and writes a partial output plus its
log-sum-exp, and a second kernel merges the splits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from specd_kernels.backend import interpreting

LOG2E = 1.4426950408889634
MAX_BLOCK_M = 128  # query rows (tokens x heads of a GQA group) per program
MIN_SPLIT_KV = 512  # keys per split at least: shorter splits cost more in merging than they gain
MAX_SPLITS = 16
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _find_request(cu_seqlens_q_ptr, q_block_id, batch, BLOCK_Q: tl.constexpr):
    """The request whose q blocks include q_block_id; request i's blocks start at cu_q[i] // BLOCK_Q + i."""
    lo: tl.int32 = 0  # typed: a batch of 1 arrives as a constexpr, and loop-carried values need one type
    hi: tl.int32 = batch
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if start <= q_block_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(acc, m_i, l_i, q, tile, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 kv_hi, ctx_len, q_pos, row_valid, q_len, tree_len, tree_ptr, qk_scale,
                 offs_d, d_mask, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                 MASKED: tl.constexpr, HAS_TREES: tl.constexpr, COMPUTE_FP32: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One BLOCK_N tile of keys into the running (acc, m_i, l_i) of the program's query rows."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    key_valid = offs_n < kv_hi
    block_ids = tl.load(block_table_ptr + offs_n // PAGE_SIZE, mask=key_valid, other=0).to(tl.int64)
    page_off = offs_n % PAGE_SIZE
    k = tl.load(k_cache_ptr + block_ids[None, :] * stride_kb + page_off[None, :] * stride_ks
                + kv_head * stride_kh + offs_d[:, None], mask=d_mask[:, None] & key_valid[None, :], other=0.0)
    v = tl.load(v_cache_ptr + block_ids[:, None] * stride_vb + page_off[:, None] * stride_vs
                + kv_head * stride_vh + offs_d[None, :], mask=key_valid[:, None] & d_mask[None, :], other=0.0)
    if COMPUTE_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if MASKED:
        new_idx = offs_n - ctx_len  # index among the request's new tokens; < 0 for context
        visible = new_idx[None, :] <= q_pos[:, None]
        if HAS_TREES:  # tree_len: q_len for a request with a tree block, else 0
            in_block = row_valid[:, None] & (new_idx >= 0)[None, :] & (new_idx < tree_len)[None, :]
            tree = tl.load(tree_ptr + q_pos[:, None] * q_len + new_idx[None, :], mask=in_block, other=0)
            visible = tl.where(in_block, tree != 0, visible)
        visible = (visible | (new_idx < 0)[None, :]) & key_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _key_tiles(tree_mask_ptr, cu_tree_mask_ptr, req, q_len, kv_len, first_q, split,
               BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, HAS_TREES: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """The key tiles a program visits: (kv_hi, tree_len, tree_ptr, tile_lo, unmasked_hi, tile_hi).
    Tiles below unmasked_hi are visible to every row (no mask work); this split owns tile_lo..tile_hi."""
    ctx_len = kv_len - q_len
    # Keys the program's rows may see: causal stops at its last token; a tree may look anywhere.
    last_q = tl.minimum(q_len, first_q + BLOCK_Q) - 1
    kv_hi = ctx_len + last_q + 1
    full_hi = ctx_len + first_q + 1  # keys below this are visible to every row
    tree_len = 0
    tree_ptr = tree_mask_ptr
    if HAS_TREES:
        tree_start = tl.load(cu_tree_mask_ptr + req)
        tree_len = tl.minimum(tl.load(cu_tree_mask_ptr + req + 1) - tree_start, q_len).to(tl.int32)
        tree_ptr = tree_mask_ptr + tree_start
        if tree_len > 0:
            kv_hi = kv_len
            full_hi = ctx_len
    num_tiles = tl.cdiv(kv_hi, BLOCK_N)
    tile_lo = 0
    tile_hi = num_tiles
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        tile_lo = tl.minimum(split * per_split, num_tiles)
        tile_hi = tl.minimum(tile_lo + per_split, num_tiles)
    unmasked_hi = tl.maximum(tl.minimum(full_hi // BLOCK_N, tile_hi), tile_lo)
    return kv_hi, tree_len, tree_ptr, tile_lo, unmasked_hi, tile_hi


@triton.jit
def _store_rows(out_ptr, lse_ptr, acc, m_i, l_i, row_off, head, offs_d, row_valid, d_mask, split,
                stride_ot, stride_oh, stride_os, stride_lt, stride_lh, NUM_SPLITS: tl.constexpr):
    """Normalise and store the rows; a split also stores its log-sum-exp for the merge kernel."""
    nonempty = l_i > 0.0  # a row that saw no key (an empty split) contributes nothing
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    out_off = row_off[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS > 1:
        tl.store(out_ptr + out_off + split * stride_os, o, mask=row_valid[:, None] & d_mask[None, :])
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        lse_off = row_off * stride_lt + head * stride_lh + split
        tl.store(lse_ptr + lse_off, lse, mask=row_valid)
    else:
        tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim] or, split, [num_tokens, num_heads, NUM_SPLITS, head_dim] fp32
    lse_ptr,  # split only: [num_tokens, num_heads, NUM_SPLITS] fp32, log2 units
    q_ptr, k_cache_ptr, v_cache_ptr,
    cu_seqlens_q_ptr, kv_lens_ptr, block_tables_ptr, tree_mask_ptr, cu_tree_mask_ptr,
    qk_scale, batch,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_bt,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_TREES: tl.constexpr, NUM_SPLITS: tl.constexpr, COMPUTE_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    q_block_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req = _find_request(cu_seqlens_q_ptr, q_block_id, batch, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + req)
    q_len = tl.load(cu_seqlens_q_ptr + req + 1) - q_start
    first_q = (q_block_id - (q_start // BLOCK_Q + req)) * BLOCK_Q  # first new token of this program
    if first_q >= q_len:
        return
    kv_len = tl.load(kv_lens_ptr + req)
    ctx_len = kv_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    q_pos = first_q + offs_m // GROUP_P  # request-local index of each row's token
    head = kv_head * GROUP + offs_m % GROUP_P
    row_valid = (q_pos < q_len) & (offs_m % GROUP_P < GROUP)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_mask = offs_d < HEAD_DIM
    row_off = (q_start + q_pos).to(tl.int64)
    q = tl.load(q_ptr + row_off[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    if COMPUTE_FP32:
        q = q.to(tl.float32)

    kv_hi, tree_len, tree_ptr, tile_lo, unmasked_hi, tile_hi = _key_tiles(
        tree_mask_ptr, cu_tree_mask_ptr, req, q_len, kv_len, first_q, split, BLOCK_Q, BLOCK_N, HAS_TREES, NUM_SPLITS)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    block_table_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt
    for tile in range(tile_lo, unmasked_hi):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, tile, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
                                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                     kv_hi, ctx_len, q_pos, row_valid, q_len, tree_len, tree_ptr, qk_scale,
                                     offs_d, d_mask, BLOCK_N, PAGE_SIZE, False, HAS_TREES, COMPUTE_FP32,
                                     DOT_PRECISION)
    for tile in range(unmasked_hi, tile_hi):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, tile, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
                                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                     kv_hi, ctx_len, q_pos, row_valid, q_len, tree_len, tree_ptr, qk_scale,
                                     offs_d, d_mask, BLOCK_N, PAGE_SIZE, True, HAS_TREES, COMPUTE_FP32,
                                     DOT_PRECISION)

    _store_rows(out_ptr, lse_ptr, acc, m_i, l_i, row_off, head, offs_d, row_valid, d_mask, split,
                stride_ot, stride_oh, stride_os, stride_lt, stride_lh, NUM_SPLITS)


@triton.jit
def _merge_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_DIM_P] fp32
    lse_ptr,  # [num_tokens, num_heads, NUM_SPLITS] fp32
    stride_ot, stride_oh, num_heads,  # part and lse are contiguous
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = token * num_heads + head
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_P)
    lse = tl.load(lse_ptr + row * NUM_SPLITS + offs_s)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # empty splits: exp2(-inf) = 0
    part = tl.load(part_ptr + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM_P + offs_d[None, :])
    o = tl.sum(part * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# ---------------------------------------------------------------- plan and launch


@dataclass
class TritonAttentionPlan:
    """A step's layout as the kernel takes it, plus the few host-side numbers that pick tile sizes.

    Built once per step (one device sync for max lengths); every layer reuses it and its buffers.
    """

    cu_seqlens_q: torch.Tensor  # [batch + 1] int32
    kv_lens: torch.Tensor  # [batch] int32
    block_tables: torch.Tensor  # [batch, max_blocks] int32, row-contiguous
    tree_mask: torch.Tensor | None  # [sum of tree block sizes] uint8 (a view of the bool mask)
    cu_tree_mask: torch.Tensor | None  # [batch + 1] int32 or int64
    block_size: int
    num_queries_per_kv: int
    max_q_len: int
    max_kv_len: int
    num_splits: int | None = None  # None: chosen from the grid size and context (force in tests)
    buffers: dict = field(default_factory=dict)  # split-KV scratch, reused by every layer


def plan_attention(
    cu_seqlens_q: torch.Tensor,  # [batch + 1] int32
    kv_lens: torch.Tensor,  # [batch] int32, after this step's K/V are stored
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    block_size: int,
    num_queries_per_kv: int,
    tree_mask: torch.Tensor | None = None,  # [sum of tree block sizes] bool
    cu_tree_mask: torch.Tensor | None = None,  # [batch + 1]
    num_splits: int | None = None,
) -> TritonAttentionPlan:
    batch = kv_lens.shape[0]
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.shape == (batch + 1,), "cu_seqlens_q: [batch + 1] int32"
    assert kv_lens.dtype == torch.int32, "kv_lens: [batch] int32"
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == batch
    if (tree_mask is None) != (cu_tree_mask is None):
        raise ValueError("tree_mask and cu_tree_mask go together")
    if tree_mask is not None:
        assert tree_mask.dim() == 1 and tree_mask.dtype in (torch.bool, torch.uint8), "tree_mask: flat bool"
        assert cu_tree_mask.shape == (batch + 1,) and cu_tree_mask.dtype in (torch.int32, torch.int64)
        tree_mask = tree_mask.contiguous().view(torch.uint8)
        if tree_mask.numel() == 0:  # no request carries a block: plain causal everywhere
            tree_mask = cu_tree_mask = None
    if batch == 0:
        return TritonAttentionPlan(cu_seqlens_q, kv_lens, block_tables, None, None, block_size,
                                   num_queries_per_kv, 0, 0, num_splits)
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    max_q, max_kv, min_q, min_ctx = torch.stack(
        [q_lens.max(), kv_lens.max(), q_lens.min(), (kv_lens - q_lens).min()]).tolist()  # one sync
    if min_q < 0 or min_ctx < 0:
        raise ValueError("bad lengths: every request needs 0 <= q_len <= kv_len")
    return TritonAttentionPlan(cu_seqlens_q, kv_lens, block_tables.contiguous(), tree_mask, cu_tree_mask,
                               block_size, num_queries_per_kv, int(max_q), int(max_kv), num_splits)


def launch_config(plan: TritonAttentionPlan, num_tokens: int, head_dim: int, num_kv_heads: int, device) -> dict:
    """Tile sizes, split count and grid height the launcher uses for this plan (benchmarks report them)."""
    group_p = triton.next_power_of_2(plan.num_queries_per_kv)
    # Short requests (decode, verify) get one program per KV head: their K/V are read once.
    block_q = min(triton.next_power_of_2(max(plan.max_q_len, 1)), max(1, MAX_BLOCK_M // group_p))
    block_q = max(block_q, 16 // group_p)  # tensor-core tiles need >= 16 rows
    num_q_blocks = num_tokens // block_q + plan.kv_lens.shape[0]  # upper bound: idle programs return at once
    num_splits = plan.num_splits or _num_splits(plan, num_q_blocks * num_kv_heads, device)
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0, "num_splits must be a power of 2"
    big = block_q * group_p * triton.next_power_of_2(head_dim) >= 128 * 128
    return dict(GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_N=64, NUM_SPLITS=num_splits,
                num_q_blocks=num_q_blocks, num_warps=8 if big else 4)


def _num_splits(plan: TritonAttentionPlan, num_programs: int, device) -> int:
    """Split the keys when the grid would give the SMs fewer than two programs each, and every split
    still gets MIN_SPLIT_KV keys. (A starting point: not tuned on a GPU yet.)"""
    if device.type != "cuda" or plan.max_q_len > 16 or plan.max_kv_len < 2 * MIN_SPLIT_KV:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if num_programs >= 2 * sms:
        return 1
    want = min(MAX_SPLITS, plan.max_kv_len // MIN_SPLIT_KV, triton.cdiv(4 * sms, num_programs))
    return 1 << (want.bit_length() - 1)


def _check_inputs(q, k_cache, v_cache, plan: TritonAttentionPlan, out) -> None:
    assert q.dim() == 3 and q.stride(-1) == 1, "q: [num_tokens, num_heads, head_dim], last dim contiguous"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches: [num_blocks, block_size, kv_heads, head_dim]"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "caches: last dim contiguous"
    assert q.dtype in DTYPES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, "q, k, v: one float dtype"
    num_heads, head_dim = q.shape[1], q.shape[2]
    assert k_cache.shape[3] == head_dim and k_cache.shape[1] == plan.block_size
    assert num_heads == k_cache.shape[2] * plan.num_queries_per_kv, "num_heads = num_kv_heads * group"
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    assert plan.block_tables.stride(1) == 1
    devices = {t.device for t in (q, k_cache, v_cache, out, plan.cu_seqlens_q, plan.kv_lens, plan.block_tables)}
    assert len(devices) == 1, f"all tensors on one device, got {devices}"


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [batch + 1] int32
    kv_lens: torch.Tensor,  # [batch] int32
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [sum_i q_len_i^2 over requests with trees] bool
    cu_tree_mask: torch.Tensor | None = None,  # [batch + 1]
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim], written in full
    plan: TritonAttentionPlan | None = None,
) -> torch.Tensor:
    """Same contract as `specd_kernels.attention.ref.paged_attention`; returns `out`."""
    num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    if plan is None:
        plan = plan_attention(cu_seqlens_q, kv_lens, block_tables, k_cache.shape[1], q.shape[1] // num_kv_heads,
                              tree_mask, cu_tree_mask)
    if out is None:
        out = torch.empty_like(q)
    _check_inputs(q, k_cache, v_cache, plan, out)
    num_tokens, num_heads = q.shape[0], q.shape[1]
    batch = plan.kv_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    assert int(plan.cu_seqlens_q.shape[0]) == batch + 1
    cfg = launch_config(plan, num_tokens, head_dim, num_kv_heads, q.device)
    head_dim_p = triton.next_power_of_2(head_dim)
    splits = cfg["NUM_SPLITS"]
    has_trees = plan.tree_mask is not None
    dummy = plan.kv_lens
    if splits > 1:
        part, lse = _split_buffers(plan, num_tokens, num_heads, splits, head_dim_p, q.device)
        target, strides = part, (part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1))
    else:
        lse, target, strides = dummy, out, (out.stride(0), out.stride(1), 0, 0, 0)
    grid = (cfg["num_q_blocks"], num_kv_heads, splits)
    _paged_attention_kernel[grid](
        target, lse, q, k_cache, v_cache,
        plan.cu_seqlens_q, plan.kv_lens, plan.block_tables,
        plan.tree_mask if has_trees else dummy, plan.cu_tree_mask if has_trees else dummy,
        scale * LOG2E, batch,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *strides, plan.block_tables.stride(0),
        GROUP=plan.num_queries_per_kv, GROUP_P=cfg["GROUP_P"], BLOCK_Q=cfg["BLOCK_Q"], BLOCK_N=cfg["BLOCK_N"],
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, PAGE_SIZE=plan.block_size,
        HAS_TREES=has_trees, NUM_SPLITS=splits, COMPUTE_FP32=interpreting() or q.dtype == torch.float32,
        # fp32 means fp32 (tf32 would cost ~1e-3 relative error); bf16/fp16 use the tensor cores as they are.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=2,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part, lse, out.stride(0), out.stride(1), num_heads,
            NUM_SPLITS=splits, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, num_warps=4,
        )
    return out


def _split_buffers(plan, num_tokens, num_heads, splits, head_dim_p, device):
    """Partial outputs [T, H, S, Dp] and log-sum-exps [T, H, S] (fp32), reused by every layer of the step."""
    key = (num_tokens, num_heads, splits, head_dim_p)
    if plan.buffers.get("key") != key:
        plan.buffers.update(key=key,
                            part=torch.empty(num_tokens, num_heads, splits, head_dim_p, device=device),
                            lse=torch.empty(num_tokens, num_heads, splits, device=device))
    return plan.buffers["part"], plan.buffers["lse"]
