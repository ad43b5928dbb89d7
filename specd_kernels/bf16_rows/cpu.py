"""`cpu.c` through specd_kernels/cbuild.py (built on first use, cached), and its calls."""
from __future__ import annotations

from pathlib import Path

import torch

from specd_kernels.cbuild import F32, F32P, I64, U8P, load as _load

SOURCE = Path(__file__).with_name("cpu.c")
SIGNATURES = (
    ("rms_norm_bf16", (F32P, I64, I64, F32P, F32, U8P)),
    ("swiglu_bf16", (U8P, I64, I64, I64, U8P)),
)


def load():
    return _load(SOURCE, SIGNATURES)


def rms_norm_bf16(lib, x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """x [rows, width] fp32 contiguous -> out [rows, width] bf16 contiguous (RMSNorm with weight)."""
    rows, width = x.shape
    assert x.dtype == weight.dtype == torch.float32 and x.is_contiguous() and weight.is_contiguous()
    assert out.dtype == torch.bfloat16 and out.is_contiguous() and out.shape == (rows, width)
    lib.rms_norm_bf16(x.data_ptr(), rows, width, weight.data_ptr(), eps, out.data_ptr())
    return out


def swiglu_bf16(lib, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """y [rows, 2 * inter] bf16 (rows strided) -> out [rows, inter] bf16 contiguous: silu(gate) * up."""
    rows, inter = out.shape
    assert y.dtype == out.dtype == torch.bfloat16 and y.stride(1) == 1 and out.is_contiguous()
    assert y.shape == (rows, 2 * inter)
    lib.swiglu_bf16(y.data_ptr(), rows, inter, y.stride(0), out.data_ptr())
    return out
