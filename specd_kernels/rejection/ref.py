"""Batched greedy / stochastic acceptance over ragged chains and trees, in the kernel's flat layout.

The rules are engine/verifier.py's (`verify_greedy`, `verify_stochastic`; its docstring defines
draft / accepted / bonus / recovered): this file only converts the flat tensors below to and from
DraftTrees and calls them, so there is one implementation of each rule and `triton.py` is checked
against it.

Layout (EMS-SD's unpadded batch):
- request i owns draft nodes cu_nodes[i] : cu_nodes[i + 1] (n_i >= 0 of them) and target rows
  cu_nodes[i] + i : cu_nodes[i + 1] + i + 1 (n_i + 1 rows: row 0 after the root, row j + 1 after node j);
- parents[node] is the request-local parent node, -1 for a child of the root; parents come first;
- greedy[i]: accept against target_tokens (the argmax of each row); otherwise speculative sampling
  against probs, with q = draft_probs rows (None: one-hot q, a deterministic drafter) and the
  request's own seed, so its draws do not depend on what else is in the batch.

Seeds: the reference draws with `torch.Generator().manual_seed(seed)`, the kernel with Philox
(seed, node index). Same distribution, different streams: stochastic results agree in
distribution, not draw for draw (tests/kernels/test_rejection.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Acceptance:
    """Per request: the accepted path and the bonus-or-recovered token."""

    num_accepted: torch.Tensor  # [batch] int32
    accepted_nodes: torch.Tensor  # [batch, max_nodes] int32, request-local node ids; -1 past num_accepted
    final_token_ids: torch.Tensor  # [batch] int64, the bonus or recovered token


def check_layout(draft_token_ids, parents, cu_nodes, greedy, target_tokens, probs, draft_probs, seeds) -> None:
    batch = greedy.shape[0]
    num_nodes = draft_token_ids.shape[0]
    assert draft_token_ids.dim() == 1 and draft_token_ids.dtype == torch.int64, "draft_token_ids: [num_nodes] int64"
    assert parents.shape == (num_nodes,) and parents.dtype == torch.int32, "parents: [num_nodes] int32"
    assert cu_nodes.shape == (batch + 1,) and cu_nodes.dtype == torch.int32, "cu_nodes: [batch + 1] int32"
    assert greedy.dtype == torch.bool, "greedy: [batch] bool"
    num_rows = num_nodes + batch
    if target_tokens is not None:
        assert target_tokens.shape == (num_rows,) and target_tokens.dtype == torch.int64, "target_tokens: [rows] int64"
    if probs is not None:
        assert probs.dim() == 2 and probs.shape[0] == num_rows and probs.dtype == torch.float32, "probs: [rows, vocab] fp32"
        assert seeds is not None and seeds.shape == (batch,) and seeds.dtype == torch.int64, "seeds: [batch] int64"
    if draft_probs is not None:
        assert probs is not None and draft_probs.shape == (num_nodes, probs.shape[1]), "draft_probs: [nodes, vocab]"
        assert draft_probs.dtype == torch.float32


def accept(
    draft_token_ids: torch.Tensor,  # [num_nodes] int64
    parents: torch.Tensor,  # [num_nodes] int32, request-local, -1 = root
    cu_nodes: torch.Tensor,  # [batch + 1] int32
    greedy: torch.Tensor,  # [batch] bool
    target_tokens: torch.Tensor | None = None,  # [num_rows] int64, needed when any request is greedy
    probs: torch.Tensor | None = None,  # [num_rows, vocab] fp32, needed when any is not
    draft_probs: torch.Tensor | None = None,  # [num_nodes, vocab] fp32 q; None = one-hot
    seeds: torch.Tensor | None = None,  # [batch] int64, with probs
    max_nodes: int | None = None,  # width of accepted_nodes; default the largest n_i
) -> Acceptance:
    from engine.types import DraftTree  # the engine imports kernels, never at kernels' import time
    from engine.verifier import verify_greedy, verify_stochastic

    check_layout(draft_token_ids, parents, cu_nodes, greedy, target_tokens, probs, draft_probs, seeds)
    cu = cu_nodes.tolist()
    batch = len(cu) - 1
    tokens, parent_list, modes = draft_token_ids.tolist(), parents.tolist(), greedy.tolist()
    targets = target_tokens.tolist() if target_tokens is not None else None
    width = max_nodes if max_nodes is not None else max([b - a for a, b in zip(cu, cu[1:])] + [0])
    num_accepted = torch.zeros(batch, dtype=torch.int32)
    accepted = torch.full((batch, width), -1, dtype=torch.int32)
    final = torch.zeros(batch, dtype=torch.int64)
    for i in range(batch):
        lo, hi = cu[i], cu[i + 1]
        q = draft_probs[lo:hi] if draft_probs is not None else None
        tree = DraftTree(tokens[lo:hi], parent_list[lo:hi], q)
        if modes[i]:
            result = verify_greedy(tree, targets[lo + i : hi + i + 1])
        else:
            generator = torch.Generator().manual_seed(int(seeds[i]))  # CPU, as the sampler's
            result = verify_stochastic(tree, probs[lo + i : hi + i + 1], generator)
        num_accepted[i] = result.num_accepted
        accepted[i, : result.num_accepted] = torch.tensor(result.accepted_nodes, dtype=torch.int32)
        final[i] = result.token_ids[-1]
    device = cu_nodes.device
    return Acceptance(num_accepted.to(device), accepted.to(device), final.to(device))
