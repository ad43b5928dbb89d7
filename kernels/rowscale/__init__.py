"""Per-row activation scaling around the int8 linear (engine/models/int8.py): `prep` fills the
linear's input buffer, `finish` turns its output back into the layer's.

The C kernels (`cpu.c`, built on first use) run unless the backend is forced to "ref"
(kernels/backend.py) or no C compiler is found; `ref.py` is the torch spec they are tested against.
"""
from __future__ import annotations

import torch

from kernels import backend
from kernels.rowscale import ref
from kernels.rowscale.ref import FIT, LO_GAIN, LO_WEIGHT, STEP

__all__ = ["prep", "finish", "uses_c", "FIT", "STEP"]


def _c_library():
    if backend.get_backend() == "ref":
        return None
    from kernels.rowscale import cpu

    return cpu.load()


def uses_c() -> bool:
    return _c_library() is not None


def _check(t: torch.Tensor, name: str) -> None:
    assert t.dtype == torch.float32 and t.device.type == "cpu", f"{name}: float32 CPU tensor, got {t.dtype} {t.device}"
    assert t.stride(-1) == 1, f"{name}: rows must be contiguous"


def prep(
    x: torch.Tensor,  # [n, width] float32
    norm_weight: torch.Tensor | None,  # [width]: RMS-normalise the rows first
    eps: float,
    buf: torch.Tensor,  # [>= 2n + 1, width] contiguous, row 0 the sentinel; rows 1..2n are written
    scales: torch.Tensor,  # [>= n] contiguous, written
) -> None:
    lib = _c_library()
    if lib is None:
        return ref.prep(x, norm_weight, eps, buf, scales)
    n, width = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    for t, name in ((x, "x"), (buf, "buf"), (scales, "scales")):
        _check(t, name)
    assert buf.is_contiguous() and buf.shape[0] >= 2 * n + 1 and buf.shape[1] == width and scales.numel() >= n
    if norm_weight is not None:
        _check(norm_weight, "norm_weight")
        assert norm_weight.shape == (width,)
    lib.rowscale_prep(x.data_ptr(), n, width, x.stride(0), None if norm_weight is None else norm_weight.data_ptr(),
                      eps, buf.data_ptr(), scales.data_ptr(), FIT, 1 / STEP, STEP, LO_GAIN)


def finish(
    y: torch.Tensor,  # [2n + 1, out] the linear's output over prep's buffer rows
    scales: torch.Tensor,  # [>= n]
    bias: torch.Tensor | None,  # [out]
    out: torch.Tensor,  # [n, out]: written, or added to when accumulate
    accumulate: bool,
) -> None:
    lib = _c_library()
    if lib is None:
        return ref.finish(y, scales, bias, out, accumulate)
    n, width = (y.shape[0] - 1) // 2, y.shape[1]
    for t, name in ((y, "y"), (scales, "scales"), (out, "out")):
        _check(t, name)
    assert y.is_contiguous() and y.shape[0] == 2 * n + 1 and out.shape == (n, width)
    if bias is not None:
        _check(bias, "bias")
        assert bias.shape == (width,)
    lib.rowscale_finish(y.data_ptr(), n, width, scales.data_ptr(), LO_WEIGHT,
                        None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), int(accumulate))
