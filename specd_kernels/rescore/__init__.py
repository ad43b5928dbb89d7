"""Exact logits for the leading candidates of an int8 lm_head (why: ref.py). On the CPU one C call
(`cpu.c`, built on first use): 25-40 us per row of 49152 logits here, against 60-220 for ref.py.
`ref.py` runs when a backend is forced or without a C compiler."""
from __future__ import annotations

import torch

from specd_kernels import backend
from specd_kernels.rescore import ref

__all__ = ["rescore_top_k"]


def _c_library(*tensors: torch.Tensor):
    if backend.get_backend() != "auto":
        return None
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors):
        return None
    from specd_kernels.rescore import cpu

    return cpu.load()


def rescore_top_k(logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, k: int) -> None:
    """ref.rescore_top_k's contract (in place on logits)."""
    lib = _c_library(logits, hidden, weight)
    if lib is None or not weight.is_contiguous():
        return ref.rescore_top_k(logits, hidden, weight, k)
    rows, vocab = logits.shape
    assert hidden.shape == (rows, weight.shape[1]) and weight.shape[0] == vocab, (logits.shape, hidden.shape,
                                                                                   weight.shape)
    if lib.rescore_top_k(logits.data_ptr(), rows, vocab, logits.stride(0), hidden.data_ptr(), hidden.stride(0),
                         weight.data_ptr(), weight.shape[1], k) != 0:
        raise ValueError(f"rescore: k must be 1..64, not {k}")
