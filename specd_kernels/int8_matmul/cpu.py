"""`cpu.c` through specd_kernels/cbuild.py (built on first use, cached), its weight packing and its call."""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from specd_kernels.cbuild import F32, F32P, I32P, I64, load as _load
from specd_kernels.int8_matmul.ref import INV_SCALE, SCALE

SOURCE = Path(__file__).with_name("cpu.c")
SIGNATURES = (
    ("int8_matmul_init", (), ctypes.c_int32),
    ("int8_matmul", (F32P, I64, I64, ctypes.c_void_p, I64, I64, I64, I32P, F32P, F32, F32P, I64), ctypes.c_int32),
)


class PackedInt8(NamedTuple):
    """A weight in AMX tiles: [n_pad / 16, k_pad / 4, 16, 4] int8, plus what the output needs."""

    tiles: torch.Tensor
    n: int
    k: int
    colsum: torch.Tensor  # [n] int32: each column's sum of int8 weights (the zero point's share)
    col_scale: torch.Tensor  # [n] fp32: scale * w_scale, rounded as fbgemm rounds it


def load():
    """The library when AMX runs here (the compiler, the CPU and the OS allow it), else None."""
    lib = _load(SOURCE, SIGNATURES)
    return lib if lib is not None and lib.int8_matmul_init() == 1 else None


def pack(weight_int8: torch.Tensor, w_scale: torch.Tensor) -> PackedInt8:
    """weight_int8 [n, k] int8, w_scale [n] -> tiles (columns padded to 32, depth to 64, with zeros)."""
    n, k = weight_int8.shape
    n_pad, k_pad = -(-n // 32) * 32, -(-k // 64) * 64
    w = F.pad(weight_int8, (0, k_pad - k, 0, n_pad - n))
    tiles = w.view(n_pad // 16, 16, k_pad // 4, 4).permute(0, 2, 1, 3).contiguous()
    colsum = weight_int8.to(torch.int32).sum(1, dtype=torch.int32)
    return PackedInt8(tiles, n, k, colsum.contiguous(), (SCALE * w_scale.float()).contiguous())


def int8_matmul(lib, x: torch.Tensor, packed: PackedInt8, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] fp32 contiguous rows -> [m, n] fp32 (into out, whose rows may be strided)."""
    m, k = x.shape
    assert x.dtype == torch.float32 and x.is_contiguous() and k == packed.k
    out = torch.empty(m, packed.n) if out is None else out
    assert out.dtype == torch.float32 and out.shape == (m, packed.n) and out.stride(1) == 1
    n_pad, k_pad = packed.tiles.shape[0] * 16, packed.tiles.shape[1] * 4
    if lib.int8_matmul(x.data_ptr(), m, k, packed.tiles.data_ptr(), packed.n, n_pad, k_pad, packed.colsum.data_ptr(),
                       packed.col_scale.data_ptr(), float(INV_SCALE), out.data_ptr(), out.stride(0)) != 0:
        raise MemoryError("int8_matmul: no memory for the quantized rows")
    return out
