"""Ragged paged attention in plain torch: the spec later Triton kernels are checked against, and the
CPU production path.

One call serves prefill, chunked prefill, decode and speculative verification for many requests
at once without padding the token batch (EMS-SD, "unpadded input tokens / unpadded KV cache"):

- q holds the new tokens of every request back to back: request i owns rows
  cu_seqlens_q[i] : cu_seqlens_q[i+1] (q_len_i rows, possibly 0).
- kv_lens[i] is request i's KV length AFTER this step's K/V were stored, so its queries sit at
  cache indices kv_lens[i] - q_len_i .. kv_lens[i] - 1 and everything before them is context.
- K/V are read from a paged cache `[num_blocks, block_size, num_kv_heads, head_dim]` through
  block_tables[i] (cache index p lives in block block_tables[i, p // block_size], offset p % block_size).
- Query j of request i sees all context plus new token k iff k <= j (causal), or, when request i
  has a tree block, iff tree_mask_i[j, k] (speculative draft trees: a node sees its ancestors).

Hidden keys (`hidden_keys [batch, width >= kv_len]` bool, optional): context keys that no row of the
request sees, though they sit in its cache and are read like any other. Only `--spec-layout
padded-kv` makes them: EMS-SD's vanilla baseline, whose rectangular cache keeps padding slots where
a request accepted fewer tokens than the batch's best. Entries at the step's new rows are ignored.

Tree masks are one flat bool tensor of concatenated row-major `[q_len_i, q_len_i]` blocks with
offsets cu_tree_mask `[batch + 1]`; an empty block (cu_tree_mask[i] == cu_tree_mask[i+1]) means
plain causal, so only requests that carry drafts pay for a block.

Cache contents outside each request's kv_len may be anything finite (padded reads are masked).

Speed (2-core CPU, SmolLM2 shapes, context 600): one padded SDPA over all short requests beats a
per-request loop (batch 16: ~2.2 ms vs ~5.5 ms per layer; batch 1: ~0.2 ms vs ~0.3 ms), so
requests with few new tokens (decode, verify) go through one batched call with a bool mask and
long prefills go one by one through SDPA's causal kernel. The masks and gather indices depend only
on the step's layout, so `plan_attention` builds them once per step and every layer reuses them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MAX_BATCHED_Q_LEN = 16
KV_PAD = 64
"""The batched group's key length is padded to a multiple of this. SDPA's reductions over a row then
see the same vector lanes and tails whatever the longest neighbour is, so a request's decode output
has the same bits alone and in any batch (measured: without it, ~5e-6 differences; with it, none)."""
"""Requests with at most this many new tokens share one padded SDPA call."""


@dataclass
class _BatchedGroup:
    """Short requests attended together: queries padded to max_q_len, keys to max_kv_len."""

    num_reqs: int
    max_q_len: int
    max_kv_len: int
    src_rows: torch.Tensor | None  # [num_reqs * max_q_len] int64 flat q row per padded query; None: identity
    dst_pos: torch.Tensor | None  # [num_valid] int64 padded positions of real queries; None: identity
    dst_rows: torch.Tensor | None  # [num_valid] int64 flat output rows of those queries
    kv_slot_ids: torch.Tensor  # [num_reqs * max_kv_len] int64 flat cache slots (pads -> slot 0)
    mask: torch.Tensor | None  # [num_reqs, 1, num_queries_per_kv * max_q_len, max_kv_len] bool, True = attend
    # Gather buffers reused by every layer of the step: fresh multi-MB buffers per layer cost more in
    # page faults than the gather itself (measured 3.1 ms vs 0.5 ms for batch 16 at context 600).
    k_buf: torch.Tensor | None = None
    v_buf: torch.Tensor | None = None
    # One request whose slots are consecutive (the usual batch-1 case): its keys are a view of the cache
    # from this slot on, no per-layer gather (at context 600 the gather copies ~1 MB per layer).
    kv_first_slot: int | None = None


@dataclass
class _SingleRequest:
    """A long request attended alone (prefill chunks)."""

    q_start: int
    q_len: int
    kv_slot_ids: torch.Tensor  # [kv_len] int64
    mask: torch.Tensor | None  # [q_len, kv_len] bool; None: no context and causal


@dataclass
class AttentionPlan:
    """Everything about a step's layout that every layer's attention shares."""

    num_queries_per_kv: int
    batched: _BatchedGroup | None = None
    singles: list[_SingleRequest] = field(default_factory=list)


def _tree_blocks(tree_mask, cu_tree_mask, q_lens: list[int]) -> dict[int, torch.Tensor]:
    """Request index -> its [q_len, q_len] bool tree block, for requests that have one."""
    if tree_mask is None:
        return {}
    cu = cu_tree_mask.tolist()
    blocks = {}
    for i, q_len in enumerate(q_lens):
        numel = cu[i + 1] - cu[i]
        if numel == 0:
            continue
        if numel != q_len * q_len:
            raise ValueError(f"tree block {i} has {numel} entries, expected {q_len}^2")
        blocks[i] = tree_mask[cu[i] : cu[i + 1]].view(q_len, q_len).to(torch.bool)
    return blocks


def check_hidden_keys(hidden_keys: torch.Tensor, kv_lens: list[int], prompt_rows=None) -> torch.Tensor:
    """hidden_keys as bool after checking its shape; a request that has any has no prompt rows
    (the C kernel's prompt path does not read them, and a padded cache only follows verification)."""
    if hidden_keys.dim() != 2 or hidden_keys.shape[0] != len(kv_lens) or hidden_keys.shape[1] < max(kv_lens, default=0):
        raise ValueError(f"hidden_keys must be [{len(kv_lens)}, >= {max(kv_lens, default=0)}], "
                         f"got {tuple(hidden_keys.shape)}")
    hidden = hidden_keys.to(torch.bool)
    if prompt_rows is not None:
        prompts = torch.as_tensor(prompt_rows).to(hidden.device) > 0
        if bool((prompts & hidden.any(dim=1)).any()):
            raise ValueError("a request with hidden keys cannot have prompt rows")
    return hidden


def _hidden_context(hidden: torch.Tensor | None, i: int, kv_len: int, q_len: int, width: int) -> torch.Tensor | None:
    """[width] bool: request i's hidden context keys (never its new rows), False past kv_len."""
    if hidden is None or not bool(hidden[i, : kv_len - q_len].any()):
        return None
    row = torch.zeros(width, dtype=torch.bool, device=hidden.device)
    row[: kv_len - q_len] = hidden[i, : kv_len - q_len]
    return row


def _slot_ids(block_tables: torch.Tensor, kv_len: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of cache indices 0..kv_len-1 of one request.  # block_tables: [max_blocks]"""
    pos = torch.arange(kv_len, device=block_tables.device)
    return block_tables.long()[pos // block_size] * block_size + pos % block_size


def _plan_batched(ids, q_lens, kv_lens, cu_q, block_tables, block_size, group_size, trees,
                  hidden=None) -> _BatchedGroup:
    device = block_tables.device
    num_reqs = len(ids)
    max_q, max_kv = max(q_lens[i] for i in ids), max(kv_lens[i] for i in ids)
    max_kv = -(-max_kv // KV_PAD) * KV_PAD
    q_len_t = torch.tensor([q_lens[i] for i in ids], device=device)
    kv_len_t = torch.tensor([kv_lens[i] for i in ids], device=device)
    j = torch.arange(max_q, device=device)
    k = torch.arange(max_kv, device=device)
    ctx = (kv_len_t - q_len_t)[:, None, None]
    # Causal with context: key k is visible to query j iff k - ctx <= j. Padded query rows (j >= q_len)
    # always see key 0, so no softmax row is empty; their outputs are dropped.
    mask = (k[None, None, :] - ctx) <= j[None, :, None]  # [num_reqs, max_q, max_kv]
    for r, i in enumerate(ids):
        if i in trees:
            c, q_len = kv_lens[i] - q_lens[i], q_lens[i]
            mask[r, :q_len, c : c + q_len] = trees[i]
        unseen = _hidden_context(hidden, i, kv_lens[i], q_lens[i], max_kv)
        if unseen is not None:
            mask[r, : q_lens[i]] &= ~unseen
    # Queries are laid out [kv_head, group * max_q] so K/V need no repeat for grouped-query attention.
    mask = mask[:, None].expand(num_reqs, group_size, max_q, max_kv).reshape(num_reqs, 1, group_size * max_q, max_kv)

    tables = block_tables.long()[torch.tensor(ids, device=device)]  # [num_reqs, max_blocks]
    cols = torch.clamp(k // block_size, max=tables.shape[1] - 1)
    slots = tables[:, cols] * block_size + k % block_size
    slots = torch.where(k[None, :] < kv_len_t[:, None], slots, torch.zeros_like(slots))

    identity = max_q == 1 and ids == list(range(len(q_lens))) and all(q == 1 for q in q_lens)
    src_rows = dst_pos = dst_rows = None
    if not identity:
        starts = torch.tensor([cu_q[i] for i in ids], device=device)
        valid = j[None, :] < q_len_t[:, None]  # [num_reqs, max_q]
        src = starts[:, None] + j[None, :]
        src_rows = torch.where(valid, src, torch.zeros_like(src)).reshape(-1)
        dst_pos = valid.reshape(-1).nonzero().squeeze(1)
        dst_rows = src.reshape(-1)[dst_pos]
    if bool(mask.all()):
        mask = None  # equal-length decode (e.g. any batch-1 decode): SDPA is ~15% faster without a mask
    first_slot = None
    if num_reqs == 1:
        kv_len, start = kv_lens[ids[0]], int(slots[0, 0])
        if int(slots[0, kv_len - 1]) == start + kv_len - 1 and _consecutive(tables[0], kv_len, block_size):
            first_slot = start
    return _BatchedGroup(num_reqs, max_q, max_kv, src_rows, dst_pos, dst_rows, slots.reshape(-1), mask, kv_first_slot=first_slot)


def _consecutive(table: torch.Tensor, kv_len: int, block_size: int) -> bool:
    """Whether the blocks holding cache indices 0..kv_len-1 are consecutive block ids."""
    used = table[: -(-kv_len // block_size)]
    return used.numel() < 2 or bool((used[1:] - used[:-1] == 1).all())


def _plan_single(i, q_lens, kv_lens, cu_q, block_tables, block_size, trees, hidden=None) -> _SingleRequest:
    q_len, kv_len = q_lens[i], kv_lens[i]
    ctx = kv_len - q_len
    mask = None
    if ctx > 0 or i in trees:
        device = block_tables.device
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        new = trees[i] if i in trees else torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        mask[:, ctx:] = new
        unseen = _hidden_context(hidden, i, kv_len, q_len, kv_len)
        if unseen is not None:
            mask &= ~unseen
    return _SingleRequest(cu_q[i], q_len, _slot_ids(block_tables[i], kv_len, block_size), mask)


def plan_attention(
    cu_seqlens_q: torch.Tensor,  # [batch + 1] int32
    kv_lens: torch.Tensor,  # [batch] int32, after this step's K/V are stored
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    block_size: int,
    num_queries_per_kv: int,
    tree_mask: torch.Tensor | None = None,  # [sum of tree block sizes] bool
    cu_tree_mask: torch.Tensor | None = None,  # [batch + 1] int offsets into tree_mask
    hidden_keys: torch.Tensor | None = None,  # [batch, width >= max kv_len] bool (see the module docstring)
) -> AttentionPlan:
    """Precompute masks and gather indices for one step (shared by all layers)."""
    cu_q = cu_seqlens_q.tolist()
    q_lens = [b - a for a, b in zip(cu_q[:-1], cu_q[1:])]
    kv_list = kv_lens.tolist()
    for q_len, kv_len in zip(q_lens, kv_list):
        if q_len < 0 or kv_len < q_len:
            raise ValueError(f"bad lengths: q_len {q_len}, kv_len {kv_len}")
    trees = _tree_blocks(tree_mask, cu_tree_mask, q_lens)
    hidden = None if hidden_keys is None else check_hidden_keys(hidden_keys, kv_list)
    plan = AttentionPlan(num_queries_per_kv)
    short = [i for i, q in enumerate(q_lens) if 0 < q <= MAX_BATCHED_Q_LEN]
    if short:
        plan.batched = _plan_batched(
            short, q_lens, kv_list, cu_q, block_tables, block_size, num_queries_per_kv, trees, hidden
        )
    for i, q_len in enumerate(q_lens):
        if q_len > MAX_BATCHED_Q_LEN:
            plan.singles.append(_plan_single(i, q_lens, kv_list, cu_q, block_tables, block_size, trees, hidden))
    return plan


def _attend_batched(g: _BatchedGroup, q, k_flat, v_flat, out, scale: float) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    group = num_heads // num_kv_heads
    m, max_q, max_kv = g.num_reqs, g.max_q_len, g.max_kv_len
    qp = q if g.src_rows is None else q.index_select(0, g.src_rows)  # [m * max_q, H, D]
    qp = qp.view(m, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    qp = qp.reshape(m, num_kv_heads, group * max_q, head_dim)
    if g.kv_first_slot is not None and g.kv_first_slot + max_kv <= k_flat.shape[0]:
        # Padded keys past kv_len read whatever follows in the cache: finite, and masked.
        k = k_flat.narrow(0, g.kv_first_slot, max_kv).view(1, max_kv, num_kv_heads, head_dim).transpose(1, 2)
        v = v_flat.narrow(0, g.kv_first_slot, max_kv).view(1, max_kv, num_kv_heads, head_dim).transpose(1, 2)
    else:
        if g.k_buf is None or g.k_buf.dtype != k_flat.dtype or g.k_buf.shape[1:] != k_flat.shape[1:]:
            g.k_buf = k_flat.new_empty((m * max_kv,) + k_flat.shape[1:])
            g.v_buf = torch.empty_like(g.k_buf)
        k = torch.index_select(k_flat, 0, g.kv_slot_ids, out=g.k_buf).view(m, max_kv, num_kv_heads, head_dim)
        v = torch.index_select(v_flat, 0, g.kv_slot_ids, out=g.v_buf).view(m, max_kv, num_kv_heads, head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    k, v = k.to(q.dtype), v.to(q.dtype)  # an fp16 cache under fp32 activations: exact
    o = F.scaled_dot_product_attention(qp, k, v, attn_mask=g.mask, scale=scale)  # [m, KVH, G*max_q, D]
    o = o.view(m, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4).reshape(m * max_q, num_heads, head_dim)
    if g.dst_pos is None:
        return o if out is None else out.copy_(o)
    out.index_copy_(0, g.dst_rows, o.index_select(0, g.dst_pos))
    return out


def _attend_single(s: _SingleRequest, q, k_flat, v_flat, out, scale: float) -> None:
    qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1)  # [H, q_len, D]
    k = k_flat.index_select(0, s.kv_slot_ids).transpose(0, 1).to(q.dtype)  # [KVH, kv_len, D]
    v = v_flat.index_select(0, s.kv_slot_ids).transpose(0, 1).to(q.dtype)
    o = F.scaled_dot_product_attention(
        qs, k, v, attn_mask=s.mask, is_causal=s.mask is None, scale=scale, enable_gqa=True
    )
    out[s.q_start : s.q_start + s.q_len] = o.transpose(0, 1)


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
    plan: AttentionPlan | None = None,
    hidden_keys: torch.Tensor | None = None,  # [batch, width] bool (planned into `plan` when one is given)
) -> torch.Tensor:
    """Attention of every new token over its own request's cached K/V. Returns `out`
    # [num_tokens, num_heads, head_dim]. `plan` (from plan_attention) skips re-deriving the layout."""
    num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    if plan is None:
        plan = plan_attention(
            cu_seqlens_q, kv_lens, block_tables, k_cache.shape[1], q.shape[1] // num_kv_heads, tree_mask, cu_tree_mask,
            hidden_keys,
        )
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    if plan.batched is not None and plan.batched.dst_pos is None and out is None:
        return _attend_batched(plan.batched, q, k_flat, v_flat, None, scale)  # pure decode: no copy
    if out is None:
        out = torch.empty_like(q)
    if plan.batched is not None:
        _attend_batched(plan.batched, q, k_flat, v_flat, out, scale)
    for s in plan.singles:
        _attend_single(s, q, k_flat, v_flat, out, scale)
    return out
