"""specd_kernels/int8_matmul: fbgemm's bits, written out (ref.py) and on AMX tiles (cpu.c), row by row."""
from __future__ import annotations

import pytest
import torch

from engine.models import int8
from engine.models.int8 import _LINEAR_DYNAMIC, REDUCE_RANGE, RowScaledInt8Linear, quantize_weight
from specd_kernels import backend, rowscale
from specd_kernels.int8_matmul import cpu, ref

AMX = int8.amx_library()
needs_amx = pytest.mark.skipif(AMX is None, reason="no AMX on this CPU (or no compiler): fbgemm runs")

# (out channels, in features, split share): the default model's layers, and widths off every tile size
SHAPES = [(960, 576, 1.0), (3072, 576, 0.5), (576, 1536, 1.0), (100, 70, 0.0), (33, 130, 0.3)]


def _weight(out_features: int, in_features: int, share: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = quantize_weight(torch.randn(out_features, in_features, generator=gen) * 0.05, share)
    qweight, _ = torch.ops.quantized.linear_unpack(weight.packed)
    return weight, qweight.int_repr(), qweight.q_per_channel_scales().float()


def _buffer(rows: int, width: int, seed: int) -> torch.Tensor:
    """A rowscale buffer (sentinel row first) of rows whose sizes span five orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen) * torch.logspace(-3, 2, rows)[:, None]
    buf, scales = RowScaledInt8Linear().buffers(rows, width)
    rowscale.prep(x, None, 0.0, buf, scales)
    return buf[: 2 * rows + 1].clone()


def _ties(rows: int, width: int, seed: int) -> torch.Tensor:
    """A buffer whose values sit on and one float step around every rounding tie of the quantization."""
    gen = torch.Generator().manual_seed(seed)
    halves = (torch.randint(-63, 63, (rows, width), generator=gen) + 0.5) * ref.SCALE
    nudge = torch.randint(-1, 2, (rows, width), generator=gen).float()
    x = torch.nextafter(halves, halves + nudge * float("inf")).where(nudge != 0, halves).clamp(-1, 1)
    return torch.cat([torch.tensor([[1.0, -1.0] + [0.0] * (width - 2)]), x])


@pytest.mark.parametrize("shape", SHAPES)
def test_the_reference_is_fbgemm_bit_for_bit(shape):
    weight, w_int8, w_scale = _weight(*shape, seed=1)
    for buf in (_buffer(9, shape[1], 2), _ties(16, shape[1], 3)):
        fbgemm = _LINEAR_DYNAMIC(buf, weight.packed, REDUCE_RANGE)[1:]
        assert torch.equal(ref.int8_matmul(buf[1:], w_int8, w_scale), fbgemm)


@needs_amx
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 50])
def test_amx_tiles_give_fbgemms_bits(shape, rows):
    weight, w_int8, w_scale = _weight(*shape, seed=4)
    packed = cpu.pack(w_int8, w_scale)
    for buf in (_buffer(rows, shape[1], 5), _ties(2 * rows, shape[1], 6)[: 2 * rows + 1]):
        expected = _LINEAR_DYNAMIC(buf, weight.packed, REDUCE_RANGE)[1:]
        out = torch.full((buf.shape[0] - 1, 2 * packed.n), float("nan"))[:, : packed.n]  # strided rows, poisoned
        cpu.int8_matmul(AMX, buf[1:].contiguous(), packed, out=out)
        assert torch.equal(out, expected)
        assert torch.isnan(out.as_strided((out.shape[0], packed.n), (2 * packed.n, 1), packed.n)).all(), "wrote past n"


@needs_amx
def test_no_rows_is_no_work():
    _, w_int8, w_scale = _weight(100, 70, 0.0, seed=9)
    assert cpu.int8_matmul(AMX, torch.empty(0, 70), cpu.pack(w_int8, w_scale)).shape == (0, 100)


@needs_amx
def test_weights_carry_tiles_and_the_layer_gives_the_same_bits_either_way():
    weight, _, _ = _weight(960, 576, 1.0, seed=7)
    assert weight.tiles is not None, "AMX runs here, so quantize_weight packs tiles"
    buf = _buffer(12, 576, 8)
    previous = backend.get_backend()
    try:
        backend.set_backend("auto")
        on_tiles = int8.matmul(buf, weight)[1:]
        backend.set_backend("ref")  # the torch path: fbgemm
        on_fbgemm = int8.matmul(buf, weight)[1:]
    finally:
        backend.set_backend(previous)
    assert torch.equal(on_tiles, on_fbgemm)
