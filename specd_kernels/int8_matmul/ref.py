"""What fbgemm's dynamic int8 linear computes on the rowscale buffer (engine/models/int8.py), written
out in torch: the bits the AMX kernel (cpu.c) must reproduce.

The buffer's range is always exactly [-1, 1] (its sentinel row), so with 7-bit activations
(reduce_range) the quantization parameters are fixed: scale 2/127, zero point 64.
"""
from __future__ import annotations

import torch

ZERO_POINT = 64
QMAX = 127
SCALE = torch.tensor(2.0 / QMAX, dtype=torch.float64).float()  # fbgemm keeps the scale in fp32
INV_SCALE = (1.0 / SCALE.double()).float()  # fbgemm's 1.f / scale


def quantize(x: torch.Tensor) -> torch.Tensor:
    """fbgemm's fma(x, 1/scale, zero point) rounded to nearest even, clamped to 0..127 (int64)."""
    t = torch.addcmul(torch.full_like(x, float(ZERO_POINT), dtype=torch.float64), x.double(), INV_SCALE.double())
    return t.float().round().clamp(0, QMAX).long()  # the fma's one rounding: exact in fp64, then to fp32


def int8_matmul(x: torch.Tensor, weight_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [m, k] fp32 rows (no sentinel) @ weight_int8 [n, k].T with per-column w_scale [n] -> [m, n] fp32."""
    acc = quantize(x) @ weight_int8.long().T - ZERO_POINT * weight_int8.long().sum(1)
    return acc.float() * (SCALE * w_scale.float())
