"""Batched greedy / stochastic acceptance in Triton: the CUDA path of specd_kernels/rejection.

Same layout and contract as `ref.py`, whose rules are engine/verifier.py's; one program per request,
so a step's whole batch is verified in one launch with no host round trip per node.

- Greedy: the longest path whose every node equals its parent row's target token, ties to the
  first-listed child. A reverse scan over the nodes (children come after parents) keeps, per row,
  the best path length below it and the child it goes through; ">=" in reverse order is "first
  listed wins" of the forward rule. Then a walk from the root emits the path and the bonus/recovered
  token.
- Stochastic: SpecInfer's recursive rejection. Scanning nodes in index order visits each row's
  children in order, and after an acceptance the accepted child's own children (all later in the
  order) are visited next, so one forward pass is the whole walk. A rejection turns the current
  target into norm(max(p - q, 0)) (one-hot q: p with the token zeroed) in the request's row of a
  scratch buffer; the final token is an inverse-CDF draw from whichever distribution is current.
  Uniforms come from Philox(seed, node index) and (seed, n) for the final draw: a request's
  randomness depends on its seed alone, not on the batch around it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specd_kernels.rejection.ref import Acceptance, check_layout

MAX_NODES = 255  # per request; rows = nodes + 1 fit one 256-wide vector
BLOCK_V = 1024  # vocabulary chunk


@triton.jit
def _greedy(node_lo, n, row_lo, draft_ptr, parents_ptr, target_ptr, accepted_ptr, MAX_ROWS: tl.constexpr):
    rows = tl.arange(0, MAX_ROWS)
    best_len = tl.zeros([MAX_ROWS], dtype=tl.int32)  # by row: longest matching path below it
    best_child = tl.full([MAX_ROWS], -1, dtype=tl.int32)
    for k in range(0, n):
        c = n - 1 - k
        parent = tl.load(parents_ptr + node_lo + c)
        match = tl.load(draft_ptr + node_lo + c) == tl.load(target_ptr + row_lo + parent + 1)
        # Registers cannot be indexed by a runtime value: vec[i] is a masked sum (twice here, below once).
        length = tl.sum(tl.where(rows == c + 1, best_len, 0), 0) + 1
        better = match & (length >= tl.sum(tl.where(rows == parent + 1, best_len, 0), 0))
        update = rows == tl.where(better, parent + 1, -1)
        best_len = tl.where(update, length, best_len)
        best_child = tl.where(update, c, best_child)
    row: tl.int32 = 0
    count: tl.int32 = 0
    child = tl.sum(tl.where(rows == 0, best_child, 0), 0)
    while child >= 0:
        tl.store(accepted_ptr + count, child)
        count += 1
        row = child + 1
        child = tl.sum(tl.where(rows == row, best_child, 0), 0)
    return count, tl.load(target_ptr + row_lo + row)


@triton.jit
def _residual_chunk(p_row_ptr, resid_ptr, q_row_ptr, in_resid, q_len, zero_token, offs, vocab):
    """max(p - q, 0) over a chunk; q_len 0 means one-hot q, i.e. p with zero_token zeroed.

    The current target is the probs row, or the residual once a sibling was rejected: both loads are
    issued, one fully masked (a scalar flag folded into the bound, not and-ed into a vector mask).
    """
    cur = (tl.load(resid_ptr + offs, mask=offs < tl.where(in_resid != 0, vocab, 0), other=0.0)
           + tl.load(p_row_ptr + offs, mask=offs < tl.where(in_resid != 0, 0, vocab), other=0.0))
    q = tl.load(q_row_ptr + offs, mask=offs < q_len, other=0.0)
    return tl.where(offs == zero_token, 0.0, tl.maximum(cur - q, 0.0))


@triton.jit
def _reject(p_row_ptr, resid_ptr, q_row_ptr, in_resid, q_len, zero_token, vocab, BLOCK: tl.constexpr):
    """Make the residual after a rejection current; returns the new in_resid flag."""
    total: tl.float32 = 0.0
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.sum(_residual_chunk(p_row_ptr, resid_ptr, q_row_ptr, in_resid, q_len, zero_token, offs, vocab), 0)
    # An all-zero residual only comes from rounding when p == q: p itself is then the right target.
    if total > 0.0:
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            r = _residual_chunk(p_row_ptr, resid_ptr, q_row_ptr, in_resid, q_len, zero_token, offs, vocab)
            tl.store(resid_ptr + offs, r / total, mask=offs < vocab)
    return tl.where(total > 0.0, 1, in_resid)


@triton.jit
def _draw(p_row_ptr, resid_ptr, in_resid, u, vocab, BLOCK: tl.constexpr):
    """Inverse-CDF draw with one uniform; a zero-probability token is never drawn (-1: no mass at all)."""
    resid_len = tl.where(in_resid != 0, vocab, 0)
    probs_len = vocab - resid_len
    total: tl.float32 = 0.0
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.sum(tl.load(resid_ptr + offs, mask=offs < resid_len, other=0.0)
                        + tl.load(p_row_ptr + offs, mask=offs < probs_len, other=0.0), 0)
    threshold = u * total
    seen: tl.float32 = 0.0
    found: tl.int32 = vocab
    last_positive: tl.int32 = -1
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        cur = (tl.load(resid_ptr + offs, mask=offs < resid_len, other=0.0)
               + tl.load(p_row_ptr + offs, mask=offs < probs_len, other=0.0))
        cdf = tl.cumsum(cur, 0) + seen
        found = tl.minimum(found, tl.min(tl.where((cdf > threshold) & (cur > 0.0), offs, vocab), 0))
        last_positive = tl.maximum(last_positive, tl.max(tl.where(cur > 0.0, offs, -1), 0))
        seen += tl.sum(cur, 0)
    return tl.where(found < vocab, found, last_positive)  # rounding past the end: the last positive


@triton.jit
def _sampled(node_lo, n, row_lo, seed, draft_ptr, parents_ptr, probs_ptr, q_ptr, resid_ptr, accepted_ptr,
             vocab, stride_p, stride_q, MAX_ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_Q: tl.constexpr):
    rows = tl.arange(0, MAX_ROWS)
    uniforms = tl.rand(seed, rows)  # node c tests with uniforms[c]; the final draw uses uniforms[n]
    row: tl.int32 = 0
    in_resid: tl.int32 = 0
    count: tl.int32 = 0
    for c in range(0, n):
        if tl.load(parents_ptr + node_lo + c) + 1 == row:  # the next child of the current row
            token = tl.load(draft_ptr + node_lo + c)
            p_row_ptr = probs_ptr + (row_lo + row).to(tl.int64) * stride_p
            p_x = tl.where(in_resid != 0, tl.load(resid_ptr + token), tl.load(p_row_ptr + token))
            q_row_ptr = q_ptr + (node_lo + c).to(tl.int64) * stride_q
            if HAS_Q:
                q_x = tl.load(q_row_ptr + token)
                one_hot = q_x <= 0.0  # q(x) = 0 breaks the drafter's contract: treat x as one-hot
                q_x = tl.where(one_hot, 1.0, q_x)
                q_len = tl.where(one_hot, 0, vocab)  # residual reads no q row for a one-hot q
                zero_token = tl.where(one_hot, token, -1)
            else:
                q_x = 1.0
                q_len = 0
                zero_token = token
            accepted = tl.sum(tl.where(rows == c, uniforms, 0.0), 0) * q_x < p_x
            if accepted:
                tl.store(accepted_ptr + count, c)
            else:
                in_resid = _reject(p_row_ptr, resid_ptr, q_row_ptr, in_resid, q_len, zero_token, vocab, BLOCK)
            row = tl.where(accepted, c + 1, row)
            in_resid = tl.where(accepted, 0, in_resid)
            count += accepted.to(tl.int32)
    p_row_ptr = probs_ptr + (row_lo + row).to(tl.int64) * stride_p
    final = _draw(p_row_ptr, resid_ptr, in_resid, tl.sum(tl.where(rows == n, uniforms, 0.0), 0), vocab, BLOCK)
    return count, final.to(tl.int64)


@triton.jit
def _accept_kernel(
    num_accepted_ptr,  # [batch] int32
    accepted_ptr,  # [batch, stride_a] int32, pre-filled with -1
    final_ptr,  # [batch] int64
    draft_ptr, parents_ptr, cu_nodes_ptr, greedy_ptr,  # [nodes] int64, [nodes] int32, [batch + 1] int32, [batch] int8
    target_ptr,  # [rows] int64
    probs_ptr,  # [rows, vocab] fp32
    q_ptr,  # [nodes, vocab] fp32
    seeds_ptr,  # [batch] int64
    resid_ptr,  # [batch, vocab] fp32 scratch
    vocab, stride_a, stride_p, stride_q,
    MAX_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    HAS_GREEDY: tl.constexpr, HAS_SAMPLED: tl.constexpr, HAS_Q: tl.constexpr,
):
    req = tl.program_id(0)
    node_lo = tl.load(cu_nodes_ptr + req)
    n = tl.load(cu_nodes_ptr + req + 1) - node_lo
    row_lo = node_lo + req
    accepted_row_ptr = accepted_ptr + req.to(tl.int64) * stride_a
    count: tl.int32 = 0
    final: tl.int64 = -1
    mode = tl.load(greedy_ptr + req)
    if HAS_GREEDY:
        if mode != 0:
            count, final = _greedy(node_lo, n, row_lo, draft_ptr, parents_ptr, target_ptr, accepted_row_ptr, MAX_ROWS)
    if HAS_SAMPLED:
        if mode == 0:
            count, final = _sampled(node_lo, n, row_lo, tl.load(seeds_ptr + req), draft_ptr, parents_ptr, probs_ptr,
                                    q_ptr, resid_ptr + req.to(tl.int64) * vocab, accepted_row_ptr,
                                    vocab, stride_p, stride_q, MAX_ROWS, BLOCK, HAS_Q)
    tl.store(num_accepted_ptr + req, count)
    tl.store(final_ptr + req, final)


def accept(
    draft_token_ids: torch.Tensor,  # [num_nodes] int64
    parents: torch.Tensor,  # [num_nodes] int32, request-local, -1 = root
    cu_nodes: torch.Tensor,  # [batch + 1] int32
    greedy: torch.Tensor,  # [batch] bool
    target_tokens: torch.Tensor | None = None,  # [num_rows] int64
    probs: torch.Tensor | None = None,  # [num_rows, vocab] fp32
    draft_probs: torch.Tensor | None = None,  # [num_nodes, vocab] fp32; None = one-hot
    seeds: torch.Tensor | None = None,  # [batch] int64
    max_nodes: int | None = None,  # width of accepted_nodes (saves a device sync when given)
) -> Acceptance:
    """Same contract as `specd_kernels.rejection.ref.accept`."""
    check_layout(draft_token_ids, parents, cu_nodes, greedy, target_tokens, probs, draft_probs, seeds)
    batch, device = greedy.shape[0], greedy.device
    if max_nodes is None:
        max_nodes = int((cu_nodes[1:] - cu_nodes[:-1]).max()) if batch else 0
    assert max_nodes <= MAX_NODES, f"at most {MAX_NODES} draft nodes per request"
    tensors = [draft_token_ids, parents, cu_nodes, greedy] + [t for t in (target_tokens, probs, draft_probs, seeds)
                                                              if t is not None]
    assert all(t.device == device for t in tensors), "one device"
    assert probs is None or (probs.stride(1) == 1 and (draft_probs is None or draft_probs.stride(1) == 1))
    num_accepted = torch.empty(batch, dtype=torch.int32, device=device)
    accepted = torch.full((batch, max(max_nodes, 1)), -1, dtype=torch.int32, device=device)
    final = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return Acceptance(num_accepted, accepted[:, :max_nodes], final)
    has_greedy, has_sampled = target_tokens is not None, probs is not None
    assert has_greedy or has_sampled, "target_tokens (greedy) or probs (sampling) needed"
    vocab = probs.shape[1] if has_sampled else 1
    dummy = cu_nodes
    resid = torch.empty(batch if has_sampled else 1, vocab, dtype=torch.float32, device=device)
    _accept_kernel[(batch,)](
        num_accepted, accepted, final, draft_token_ids, parents, cu_nodes, greedy.view(torch.int8),
        target_tokens if has_greedy else dummy, probs if has_sampled else resid,
        draft_probs if draft_probs is not None else resid, seeds if has_sampled else dummy, resid,
        vocab, accepted.stride(0), probs.stride(0) if has_sampled else 0,
        draft_probs.stride(0) if draft_probs is not None else 0,
        MAX_ROWS=triton.next_power_of_2(max_nodes + 1), BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)),
        HAS_GREEDY=has_greedy, HAS_SAMPLED=has_sampled, HAS_Q=draft_probs is not None, num_warps=4,
    )
    return Acceptance(num_accepted, accepted[:, :max_nodes], final)
