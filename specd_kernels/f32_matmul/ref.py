"""What specd_kernels/f32_matmul/cpu.c computes, in torch: y = x @ weight.T in fp32.

The C kernel sums each output as one fused multiply-add chain over the depth in order, so its bits
differ from this (blocked, tree-summed) matmul by rounding only; tests compare within a tolerance and
check the kernel's own invariance (a row's bits alone and among others) separately.
"""
from __future__ import annotations

import torch


def f32_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [m, k] fp32 @ weight [n, k].T -> [m, n] fp32."""
    return x @ weight.T
