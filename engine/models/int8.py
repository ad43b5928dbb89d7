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
same text. The buffer layout and arithmetic are kernels/rowscale (C, with a torch reference).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from kernels import rowscale

REDUCE_RANGE = True


def _compiled_linear_dynamic():
    """fbgemm's dynamic linear `(x, packed, reduce_range) -> y`, called through TorchScript.

    A Python call of the op converts the packed weight (a script object) through pybind11, and perf
    shows C++ exception unwinding on every such call: ~18 us for a 64x64 layer, ~6.5 from TorchScript,
    so 1.3-1.6 ms less per batch-1 step of the default model's 121 int8 matmuls (2-core dev CPU).
    torch.jit is deprecated but works in the pinned torch. Without it: the resolved overload's C++
    function, not the packet or the overload, whose Python dispatch checks cost 4-10 us more per call.
    """
    try:
        def linear_dynamic(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase,
                           reduce_range: bool) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic(x, packed, reduce_range)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(linear_dynamic)
    except Exception:  # noqa: BLE001 - a torch without TorchScript: the direct call works, only slower
        return getattr(torch.ops.quantized.linear_dynamic.default, "_op", torch.ops.quantized.linear_dynamic.default)


_LINEAR_DYNAMIC = _compiled_linear_dynamic()


# The int8 dtypes, by the layers whose weights go in split (Int8Weight.halves == 2). Teacher-forced
# top-1 agreement with fp32 on 24 Spec-Bench prompts (weights rounded offline, activations exact),
# one kind of layer int8 at a time: qkv 96.7%, down 97.7%, gate_up 98.3%, o 99.0%; all whole 94.7%;
# all split 99.8%; all but o split 99.0% (o is the cheapest to leave whole: 576 rows). The quality
# bar (98%) needs the split. The lm_head stays whole under both: its leading candidates are rescored
# exactly instead (kernels/rescore), which matched splitting it (98.96 vs 99.00%) without reading 28 MB
# more per step.
SPLIT_LAYERS = {"int8": frozenset({"qkv", "gate_up", "down"}), "int8-fast": frozenset()}


class Int8Weight(NamedTuple):
    """A linear weight as fbgemm multiplies it."""

    packed: object  # fbgemm's packed params (per-output-channel int8, symmetric)
    halves: int  # 1: rows q(W); 2: rows [q(W); q(W - q(W))], whose outputs add up (~15-bit weights)


def _per_channel_int8(weight: torch.Tensor) -> torch.Tensor:
    scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm's linear still takes them
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)


def quantize_weight(weight: torch.Tensor, split: bool = False) -> Int8Weight:
    """fp weight [out, in] -> int8 per output channel; split also packs the rounding residual as
    rows of their own (twice the rows and work, for a rounding step 127x finer)."""
    weight = weight.float().contiguous()
    if split:
        weight = torch.cat([weight, weight - _per_channel_int8(weight).dequantize()])
    return Int8Weight(torch.ops.quantized.linear_prepack(_per_channel_int8(weight), None), 2 if split else 1)


def dequantize_weight(weight: Int8Weight) -> torch.Tensor:
    """The fp32 weight the int8 layer really multiplies by (for tests and quality reports)."""
    qweight, _ = torch.ops.quantized.linear_unpack(weight.packed)
    halves = qweight.dequantize().chunk(weight.halves)
    return halves[0] if weight.halves == 1 else halves[0] + halves[1]


class RowScaledInt8Linear:
    """Callable `(x, packed, bias, norm=None, residual=None) -> y` with per-row activation scales.

    norm=(weight, eps) RMS-normalises x first; residual gets the output added in place and is
    returned (the layer's skip connection), both fused into the row scaling (kernels/rowscale).
    Bias is added after rescaling (not packed), since the packed layer sees scaled inputs.
    Owns reusable buffers, so not thread-safe: one instance per model, used by the engine thread only.
    """

    def __init__(self):
        self._buffers: dict[int, torch.Tensor] = {}  # in_features -> [1 + capacity, in_features]
        self._scales = torch.empty(0)

    def _buffer(self, rows: int, width: int) -> torch.Tensor:
        buf = self._buffers.get(width)
        if buf is None or buf.shape[0] < rows + 1:
            capacity = max(rows, 2 * (0 if buf is None else buf.shape[0] - 1), 16)
            buf = torch.zeros(capacity + 1, width)
            buf[0, 0], buf[0, 1] = 1.0, -1.0  # the sentinel row: range is always exactly [-1, 1]
            self._buffers[width] = buf
        return buf

    def __call__(self, x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None,
                 norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        rows, width = x.shape
        buf = self._buffer(2 * rows, width)
        if self._scales.numel() < rows:
            self._scales = torch.empty(max(rows, 2 * self._scales.numel(), 16))
        norm_weight, eps = norm if norm is not None else (None, 0.0)
        rowscale.prep(x, norm_weight, eps, buf, self._scales)
        y = _LINEAR_DYNAMIC(buf[: 2 * rows + 1], weight.packed, REDUCE_RANGE)
        out = residual if residual is not None else torch.empty(rows, y.shape[1] // weight.halves)
        rowscale.finish(y, self._scales, bias, out, accumulate=residual is not None)
        return out
