"""Per-row activation scaling around the int8 linear (engine/models/int8.py): `prep` fills the
linear's input buffer, `finish` turns its output back into the layer's.

The C kernels (`cpu.c`, built on first use) run unless the backend is forced to "ref"
(specd_kernels/backend.py) or no C compiler is found; `ref.py` is the torch spec they are tested against.
"""
from __future__ import annotations

import torch

from specd_kernels import backend
from specd_kernels.rowscale import ref
from specd_kernels.rowscale.ref import FIT, LO_GAIN, LO_WEIGHT, STEP

__all__ = ["prep", "finish", "uses_c", "FIT", "STEP"]


_resolved: tuple[str, object] = ("", None)  # (backend it was resolved for, library or None)


def _c_library():
    """Called twice per linear layer, so resolved once per backend setting."""
    global _resolved
    name = backend.get_backend()
    if _resolved[0] != name:
        from specd_kernels.rowscale import cpu

        _resolved = (name, None if name == "ref" else cpu.load())
    return _resolved[1]


def uses_c() -> bool:
    return _c_library() is not None


def prep(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, buf: torch.Tensor,
         scales: torch.Tensor) -> None:
    """ref.prep's contract. buf and scales are the caller's reusable buffers (contiguous fp32, big
    enough: engine/models/int8.py sizes them), so only x is checked on this per-linear path."""
    lib = _c_library()
    if lib is None:
        return ref.prep(x, norm_weight, eps, buf, scales)
    n, width = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    assert x.dtype == torch.float32 and buf.shape[0] > 2 * n and buf.shape[1] == width, (x.dtype, x.shape, buf.shape)
    lib.rowscale_prep(x.data_ptr(), n, width, x.stride(0), None if norm_weight is None else norm_weight.data_ptr(),
                      eps, buf.data_ptr(), scales.data_ptr(), FIT, 1 / STEP, STEP, LO_GAIN)


def finish(y: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
           accumulate: bool, residual_of: torch.Tensor | None = None) -> None:
    """ref.finish's contract; y is the linear's fresh output, out a contiguous-row fp32 [n, out],
    residual_of a contiguous int32 [out] (the caller's, built once per weight)."""
    lib = _c_library()
    if lib is None:
        return ref.finish(y, scales, bias, out, accumulate, residual_of)
    n, width = (y.shape[0] - 1) // 2, out.shape[1]
    assert y.is_contiguous() and out.shape[0] == n and out.stride(1) == 1, (y.shape, out.shape)
    assert (y.shape[1] == width) if residual_of is None else (y.shape[1] > width and residual_of.shape == (width,)
                                                              and residual_of.dtype == torch.int32), (y.shape, out.shape)
    lib.rowscale_finish(y.data_ptr(), n, width, y.shape[1], scales.data_ptr(), LO_WEIGHT,
                        None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), int(accumulate),
                        None if residual_of is None else residual_of.data_ptr())
