"""int8 linear layers for the CPU: per-output-channel int8 weights, activations quantized per token row.

The matmul is torch's fbgemm dynamic-quantized linear (a maintained library path; measured on the
2-core dev CPU at ~42 us for one row of a 576x1536 layer against ~80 us in fp32, and 8 rows for
~1.8x one row instead of ~2.8x).

Per-row scales. fbgemm picks ONE activation scale per call from the whole input tensor's range, so a
request's numbers would depend on the other requests of the batch and on its own draft rows, and
speculation would stop being lossless. A linear layer is linear, so each row is divided by its own
max-abs, a fixed sentinel row holding +1 and -1 sits in front so the tensor-wide range is always
exactly [-1, 1] (fixed quantization parameters), and each output row is multiplied back. The int32
accumulation is exact, so every row is bit-identical alone or in any batch (tests/unit/test_int8.py).

Two passes. Without VNNI, fbgemm's AVX2 kernel sums pairs of u8*s8 products in int16, so activations
get 7 bits (reduce_range): only ~64 levels per sign, and the default model's teacher-forced top-1
agreement with fp32 was 77% (perplexity +1.4%). So each row goes in twice: its 7-bit value, and the
rounding residual scaled up to the full range; the outputs add back (~13-bit activations). Decode is
bound by reading the weights, so the second row is nearly free there; agreement rose to 96% on the
same text. Rows are scaled to [-FIT, FIT] so no value reaches the clamp at the ends of the range,
which keeps the residual what we compute it to be.
"""
from __future__ import annotations

import warnings

import torch

REDUCE_RANGE = True
STEP = 2.0 / 127  # fbgemm's activation step for the fixed range [-1, 1] over 7 bits
FIT = 0.98  # rows span [-FIT, FIT]: round(FIT / STEP) + zero point 64 stays inside 0..127
# The resolved overload, not the packet: the packet's Python dispatch checks cost ~10 us per call,
# a millisecond per forward at batch 1.
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """fp weight [out, in] -> fbgemm packed params with symmetric per-output-channel int8 scales."""
    weight = weight.float().contiguous()
    scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm's linear still takes them
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())


def dequantize_weight(packed) -> torch.Tensor:
    """The fp32 weight the int8 layer really multiplies by (for tests and quality reports)."""
    qweight, _ = torch.ops.quantized.linear_unpack(packed)
    return qweight.dequantize()


class RowScaledInt8Linear:
    """Callable `(x, packed, bias) -> y` with per-row activation scales; owns reusable input buffers.

    Bias is added after rescaling (not packed), since the packed layer sees scaled inputs.
    Not thread-safe: one instance per model, used by the engine thread only.
    """

    def __init__(self):
        self._buffers: dict[int, torch.Tensor] = {}  # in_features -> [1 + capacity, in_features]

    def _buffer(self, rows: int, width: int) -> torch.Tensor:
        buf = self._buffers.get(width)
        if buf is None or buf.shape[0] < rows + 1:
            capacity = max(rows, 2 * (0 if buf is None else buf.shape[0] - 1), 16)
            buf = torch.zeros(capacity + 1, width)
            buf[0, 0], buf[0, 1] = 1.0, -1.0  # the sentinel row: range is always exactly [-1, 1]
            self._buffers[width] = buf
        return buf

    def __call__(self, x: torch.Tensor, packed, bias: torch.Tensor | None) -> torch.Tensor:
        rows, width = x.shape
        buf = self._buffer(2 * rows, width)
        scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_min_(1e-30).div_(FIT)
        hi, lo = buf[1 : rows + 1], buf[rows + 1 : 2 * rows + 1]
        torch.div(x, scale, out=hi)
        # The residual of rounding hi to fbgemm's grid (step STEP, integer zero point), scaled to the range.
        torch.sub(hi, torch.round(hi * (1 / STEP)).mul_(STEP), out=lo).mul_(2 * FIT / STEP)
        y = _LINEAR_DYNAMIC(buf[: 2 * rows + 1], packed, REDUCE_RANGE)
        out = torch.add(y[1 : rows + 1], y[rows + 1 :], alpha=STEP / (2 * FIT)).mul_(scale)
        return out if bias is None else out.add_(bias)
