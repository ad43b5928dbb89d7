"""What specd_kernels/bf16_rows/cpu.c computes, in torch (the spec its tests hold it to)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[rows, width] fp32 -> bf16 RMSNorm rows."""
    inv_rms = torch.rsqrt(x.double().pow(2).mean(dim=1, keepdim=True) + eps)
    return (x.double() * inv_rms * weight.double()).to(torch.bfloat16)


def swiglu_bf16(y: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * inter] bf16 (gate, up) -> [rows, inter] bf16 silu(gate) * up."""
    gate, up = y.double().chunk(2, dim=1)
    return (F.silu(gate) * up).to(torch.bfloat16)
