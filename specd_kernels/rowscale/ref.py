"""Per-row activation scaling around fbgemm's int8 linear, in plain torch: the spec `cpu.c` follows.

fbgemm's dynamic linear quantizes its whole input with ONE scale taken from the tensor's range. To
give every token row its own scale (so a row's result never depends on the rest of the batch, see
engine/models/int8.py), the rows go in pre-scaled in a buffer laid out as

    row 0            the sentinel: +1, -1, zeros (fixes the tensor's range at exactly [-1, 1])
    rows 1..n        hi: each input row divided by its own max-abs (times 1/FIT)
    rows n+1..2n     lo: hi's rounding residual on fbgemm's 7-bit grid, scaled up to the range

and the linear's output rows are recombined and scaled back by `finish`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STEP = 2.0 / 127
"""fbgemm's activation step for the fixed range [-1, 1] over 7 bits (reduce_range, see int8.py)."""
FIT = 0.98
"""Rows span [-FIT, FIT]: round(FIT / STEP) + zero point 64 stays inside 0..127, so no value clamps
and the residual is exactly what we compute it to be."""
LO_GAIN = 2 * FIT / STEP  # residual (at most STEP / 2) -> the range [-FIT, FIT]
LO_WEIGHT = 1 / LO_GAIN


def prep(
    x: torch.Tensor,  # [n, width] float32
    norm_weight: torch.Tensor | None,  # [width]: RMS-normalise the rows first
    eps: float,
    buf: torch.Tensor,  # [>= 2n + 1, width] float32, row 0 the sentinel; rows 1..2n are written
    scales: torch.Tensor,  # [>= n] float32, written
) -> None:
    n = x.shape[0]
    if norm_weight is not None:
        x = F.rms_norm(x, (x.shape[1],), norm_weight, eps)
    scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_min_(1e-30).div_(FIT)
    hi, lo = buf[1 : n + 1], buf[n + 1 : 2 * n + 1]
    torch.div(x, scale, out=hi)
    torch.sub(hi, torch.round(hi * (1 / STEP)).mul_(STEP), out=lo).mul_(LO_GAIN)
    scales[:n] = scale.squeeze(1)


def finish(
    y: torch.Tensor,  # [2n + 1, out + r] the linear's output over prep's rows (r: a split weight's residual rows)
    scales: torch.Tensor,  # [>= n]
    bias: torch.Tensor | None,  # [out]
    out: torch.Tensor,  # [n, out]: written, or added to when accumulate
    accumulate: bool,
    residual_of: torch.Tensor | None = None,  # [out] int32: the y column of each channel's residual, or -1
) -> None:
    n, width = (y.shape[0] - 1) // 2, out.shape[1]
    hi, lo = y[1 : n + 1, :width], y[n + 1 :, :width]
    if residual_of is not None:  # a split weight (engine/models/int8.py): residual outputs add to their channels
        channels = (residual_of >= 0).nonzero().squeeze(1)
        columns = residual_of[channels].long()
        hi, lo = hi.clone(), lo.clone()
        hi[:, channels] += y[1 : n + 1, columns]
        lo[:, channels] += y[n + 1 :, columns]
    value = torch.add(hi, lo, alpha=LO_WEIGHT).mul_(scales[:n, None])
    if bias is not None:
        value.add_(bias)
    if accumulate:
        out.add_(value)
    else:
        out.copy_(value)
