"""`cpu.c` through specd_kernels/cbuild.py (built on first use, cached), its weight packing and its call."""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from specd_kernels.cbuild import F32, F32P, I32, I64, load as _load

SOURCE = Path(__file__).with_name("cpu.c")
PANEL = 16  # output columns per weight panel (cpu.c)
SIGNATURES = (
    ("f32_matmul_init", (), ctypes.c_int32),
    ("f32_matmul", (F32P, I64, I64, F32P, I64, F32P, I64, F32P, F32, I32), ctypes.c_int32),
)


class PackedF32(NamedTuple):
    """A weight [n, k] as [ceil(n / 16), k, 16] fp32 panels (zero columns past n)."""

    panels: torch.Tensor
    n: int
    k: int


def load():
    """The library when its vector kernel runs here (AVX2 + FMA or AVX-512, and a compiler), else None."""
    lib = _load(SOURCE, SIGNATURES)
    return lib if lib is not None and lib.f32_matmul_init() == 1 else None


def pack(weight: torch.Tensor) -> PackedF32:
    n, k = weight.shape
    padded = F.pad(weight.float(), (0, 0, 0, -n % PANEL))
    return PackedF32(padded.view(-1, PANEL, k).transpose(1, 2).contiguous(), n, k)


def f32_matmul(lib, x: torch.Tensor, packed: PackedF32, out: torch.Tensor | None = None, norm=None,
               accumulate: bool = False) -> torch.Tensor:
    """x [m, k] fp32 -> [m, n] fp32 into out (rows may be strided; accumulate: added to what out holds).
    norm=(weight, eps): x's rows RMS-normalised first."""
    if not x.is_contiguous():
        x = x.contiguous()
    m, k = x.shape
    assert x.dtype == torch.float32 and k == packed.k, (x.dtype, x.shape, packed.k)
    assert out is not None or not accumulate
    out = torch.empty(m, packed.n) if out is None else out
    assert out.dtype == torch.float32 and out.shape == (m, packed.n) and out.stride(1) == 1, (out.dtype, out.shape)
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    assert norm_weight is None or (norm_weight.dtype == torch.float32 and norm_weight.is_contiguous()
                                   and norm_weight.shape == (k,))
    if lib.f32_matmul(x.data_ptr(), m, k, packed.panels.data_ptr(), packed.n, out.data_ptr(), out.stride(0),
                      None if norm_weight is None else norm_weight.data_ptr(), eps, int(accumulate)) != 0:
        raise MemoryError("f32_matmul: no memory for the normalised rows")
    return out
