"""Batched greedy / stochastic acceptance; dispatch between the Triton kernel and the reference
(specd_kernels/backend.py: CUDA tensors -> Triton, CPU -> `ref.py`, which runs engine/verifier.py's rules)."""
from __future__ import annotations

import torch

from specd_kernels import backend
from specd_kernels.rejection import ref
from specd_kernels.rejection.ref import Acceptance

_TRITON = "specd_kernels.rejection.triton"

__all__ = ["accept", "Acceptance"]


def accept(
    draft_token_ids: torch.Tensor,  # [num_nodes] int64
    parents: torch.Tensor,  # [num_nodes] int32, request-local, -1 = root
    cu_nodes: torch.Tensor,  # [batch + 1] int32
    greedy: torch.Tensor,  # [batch] bool
    target_tokens: torch.Tensor | None = None,  # [num_rows] int64 (rows = nodes + batch)
    probs: torch.Tensor | None = None,  # [num_rows, vocab] fp32
    draft_probs: torch.Tensor | None = None,  # [num_nodes, vocab] fp32; None = one-hot q
    seeds: torch.Tensor | None = None,  # [batch] int64
    max_nodes: int | None = None,
) -> Acceptance:
    """Verify every request's draft tree at once; see specd_kernels/rejection/ref.py for the layout."""
    impl = backend.load(_TRITON) if backend.use_triton(cu_nodes) else ref
    return impl.accept(draft_token_ids, parents, cu_nodes, greedy, target_tokens, probs, draft_probs, seeds, max_nodes)
