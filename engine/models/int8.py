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
same text. The buffer layout and arithmetic are specd_kernels/rowscale (C, with a torch reference).

AMX. Where the CPU has AMX tiles, the same int8 weights are also packed into tiles and multiplied by
specd_kernels/int8_matmul (C), whose output has fbgemm's bits (checked on every weight at load, else that
weight stays on fbgemm) and which costs about the same for 1 row as for 16: 30 layers of the default
model's matmuls, 16 rows (32 buffer rows) 21.4 -> 10.2 ms, 48 rows 43.7 -> 16.0, one row 9.5 -> 9.2
(2-core Intel dev CPU). Since the bits are fbgemm's, nothing a request sees depends on the host's AMX.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch

from specd_kernels import backend, rowscale
from specd_kernels.int8_matmul import cpu as amx

REDUCE_RANGE = True


def _compiled_linear_dynamic():
    """fbgemm's dynamic linear `(x, packed, reduce_range) -> y`, called through TorchScript.

    A Python call of the op converts the packed weight (a script object) through pybind11, and perf
    shows C++ exception unwinding on every such call: ~18 us for a 64x64 layer, ~6.5 from TorchScript
    (1 thread); 16-20 us less per call at the default model's shapes with 2 threads, and a batch-1
    decode step (121 int8 matmuls) 24.5 instead of 26.7 ms (means of 3 interleaved pairs, 2-core dev CPU).
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


# The int8 dtypes: the share of each layer's output channels whose weights go in split (their
# rounding residual packed as rows of its own, see quantize_weight); other layers and channels whole.
# Teacher-forced top-1 agreement with fp32 on 24 Spec-Bench prompts (weights rounded offline,
# activations exact), one kind of layer int8 at a time: qkv 96.7%, down 97.7%, gate_up 98.3%, o 99.0%;
# all whole 94.7%; all split 99.8%; all but o split 99.0% (o is the cheapest to leave whole: 576 rows).
# The quality bar (98%) needs the split. gate_up is half the bytes a batch-1 step reads: splitting only
# its channels with the largest rounding error (half of them hold 64-69% of its error energy in the
# default model's layers 0, 10, 20 and 29) keeps most of the quality for fewer bytes; the share was chosen by
# benchmarks/int8_quality.py (README). The lm_head stays whole under both: its leading candidates are
# rescored exactly instead (specd_kernels/rescore), which matched splitting it (98.96 vs 99.00%) without
# reading 28 MB more per step.
SPLIT_SHARES = {"int8": {"qkv": 1.0, "gate_up": 0.5, "down": 1.0}, "int8-fast": {}}


class Int8Weight(NamedTuple):
    """A linear weight as fbgemm multiplies it: rows q(W), then q(R) for the split channels' rounding
    residuals R = W - q(W), whose outputs add to their channels' (~15-bit weights there)."""

    packed: object  # fbgemm's packed params (per-output-channel int8, symmetric)
    out_features: int
    residual_of: torch.Tensor | None  # [out_features] int32: the output column of each channel's residual, or -1
    tiles: amx.PackedInt8 | None = None  # the same int8 weights in AMX tiles, where AMX runs here


def _per_channel_int8(weight: torch.Tensor) -> torch.Tensor:
    scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm's linear still takes them
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)


def quantize_weight(weight: torch.Tensor, split_share: float = 0.0) -> Int8Weight:
    """fp weight [out, in] -> int8 per output channel. split_share of the channels, those with the
    largest rounding error (ties: the lower channel), also get their residual packed as rows of their
    own: a rounding step 127x finer there, for that many more rows of weights and work."""
    weight = weight.float().contiguous()
    out_features = weight.shape[0]
    num_split = round(split_share * out_features)
    if num_split == 0:
        return _with_tiles(torch.ops.quantized.linear_prepack(_per_channel_int8(weight), None), out_features, None)
    residual = weight - _per_channel_int8(weight).dequantize()
    by_error = torch.sort(residual.double().norm(dim=1), descending=True, stable=True).indices
    channels = torch.sort(by_error[:num_split]).values  # residual rows in channel order
    residual_of = torch.full((out_features,), -1, dtype=torch.int32)
    residual_of[channels] = torch.arange(out_features, out_features + num_split, dtype=torch.int32)
    rows = torch.cat([weight, residual[channels]])
    return _with_tiles(torch.ops.quantized.linear_prepack(_per_channel_int8(rows), None), out_features, residual_of)


@functools.cache
def amx_library():
    """specd_kernels/int8_matmul when AMX runs here, else None."""
    return amx.load()


def _with_tiles(packed, out_features: int, residual_of: torch.Tensor | None) -> Int8Weight:
    """The weight, with AMX tiles when they run here and give fbgemm's bits on it."""
    weight = Int8Weight(packed, out_features, residual_of)
    lib = amx_library()
    if lib is None:
        return weight
    qweight, _ = torch.ops.quantized.linear_unpack(packed)
    tiled = weight._replace(tiles=amx.pack(qweight.int_repr(), qweight.q_per_channel_scales().float()))
    buf = _check_rows(qweight.shape[1])
    if torch.equal(amx.int8_matmul(lib, buf[1:], tiled.tiles), _LINEAR_DYNAMIC(buf, packed, REDUCE_RANGE)[1:]):
        return tiled
    warnings.warn(f"AMX int8 matmul differs from fbgemm on a {tuple(qweight.shape)} weight: it stays on fbgemm")
    return weight


def _check_rows(width: int) -> torch.Tensor:
    """A rowscale buffer of 8 rows (sentinel first) from fixed random inputs of wide-ranging size."""
    linear = RowScaledInt8Linear()
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(8, width, generator=gen) * torch.logspace(-3, 2, 8)[:, None]
    buf, scales = linear.buffers(8, width)
    rowscale.prep(x, None, 0.0, buf, scales)
    return buf[:17]


def matmul(buf: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """The int8 matmul of a rowscale buffer [1 + 2 rows, in] (sentinel row first) -> [1 + 2 rows, y width];
    row 0 of the result is unspecified (nothing reads it). On AMX tiles where they are packed and the
    C kernels run, else fbgemm: the same bits."""
    if weight.tiles is None or backend.get_backend() != "auto":
        return _LINEAR_DYNAMIC(buf, weight.packed, REDUCE_RANGE)
    y = torch.empty(buf.shape[0], weight.tiles.n)
    amx.int8_matmul(amx_library(), buf[1:], weight.tiles, out=y[1:])
    return y


def dequantize_weight(weight: Int8Weight) -> torch.Tensor:
    """The fp32 weight the int8 layer really multiplies by (for tests and quality reports)."""
    qweight, _ = torch.ops.quantized.linear_unpack(weight.packed)
    rows = qweight.dequantize()
    whole = rows[: weight.out_features].clone()
    if weight.residual_of is not None:
        channels = (weight.residual_of >= 0).nonzero().squeeze(1)
        whole[channels] += rows[weight.residual_of[channels].long()]
    return whole


class RowScaledInt8Linear:
    """Callable `(x, packed, bias, norm=None, residual=None) -> y` with per-row activation scales.

    norm=(weight, eps) RMS-normalises x first; residual gets the output added in place and is
    returned (the layer's skip connection), both fused into the row scaling (specd_kernels/rowscale).
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

    def buffers(self, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The input buffer (sentinel row first) and row scales for `rows` rows of `width` inputs."""
        if self._scales.numel() < rows:
            self._scales = torch.empty(max(rows, 2 * self._scales.numel(), 16))
        return self._buffer(2 * rows, width), self._scales

    def __call__(self, x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None,
                 norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        rows, width = x.shape
        buf, scales = self.buffers(rows, width)
        norm_weight, eps = norm if norm is not None else (None, 0.0)
        rowscale.prep(x, norm_weight, eps, buf, scales)
        y = matmul(buf[: 2 * rows + 1], weight)
        out = residual if residual is not None else torch.empty(rows, weight.out_features)
        rowscale.finish(y, scales, bias, out, accumulate=residual is not None, residual_of=weight.residual_of)
        return out
