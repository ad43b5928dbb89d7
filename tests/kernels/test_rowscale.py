"""specd_kernels/rowscale: the C kernels against the torch reference (ref.py), and their batch invariance."""
from __future__ import annotations

import shutil

import pytest
import torch

from engine.models.int8 import _LINEAR_DYNAMIC, REDUCE_RANGE, quantize_weight
from specd_kernels import backend, cbuild, rowscale
from specd_kernels.rowscale import ref

pytestmark = pytest.mark.skipif(shutil.which(cbuild.compiler()) is None, reason="no C compiler")


@pytest.fixture(autouse=True)
def c_kernels():
    previous = backend.get_backend()
    backend.set_backend("auto")
    assert rowscale.uses_c(), "a C compiler is here, so the C kernels must build"
    yield
    backend.set_backend(previous)


def _rows(n: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=gen) * torch.logspace(-3, 2, n)[:, None]
    x[:, 3] *= 40  # an outlier channel, as LLM hidden states have
    return x


def _buffers(n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = torch.full((2 * n + 3, width), float("nan"))
    buf[0] = 0
    buf[0, 0], buf[0, 1] = 1.0, -1.0
    return buf, torch.full((n + 2,), float("nan"))


def _prep(impl, x, norm_weight):
    buf, scales = _buffers(*x.shape)
    impl(x, norm_weight, 1e-5, buf, scales)
    n = x.shape[0]
    return buf[: 2 * n + 1], scales[:n]


@pytest.mark.parametrize("width", [64, 576, 1536])
def test_prep_matches_reference_bit_for_bit(width):
    x = _rows(9, width, width)
    buf, scales = _prep(rowscale.prep, x, None)
    want_buf, want_scales = _prep(ref.prep, x, None)
    assert torch.equal(buf, want_buf) and torch.equal(scales, want_scales)
    assert buf[1:].abs().max() <= rowscale.FIT + 1e-6  # nothing reaches fbgemm's clamp


def test_prep_with_rms_norm_matches_reference():
    """The norm's sum runs in another order than torch's, so compare what the int8 layer computes."""
    x, gen = _rows(7, 576, 1), torch.Generator().manual_seed(2)
    norm_weight = torch.rand(576, generator=gen) + 0.5
    packed = quantize_weight(torch.randn(320, 576, generator=gen) * 0.05)
    outs = []
    for impl in (rowscale.prep, ref.prep):
        buf, scales = _prep(impl, x, norm_weight)
        out = torch.empty(7, 320)
        ref.finish(_LINEAR_DYNAMIC(buf, packed.packed, REDUCE_RANGE), scales, None, out, accumulate=False)
        outs.append(out)
    err = (outs[0] - outs[1]).norm(dim=1) / outs[1].norm(dim=1)
    assert err.max() < 1e-4, err


@pytest.mark.parametrize("num_split", [0, 7, 96])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_finish_matches_reference(with_bias, accumulate, num_split):
    gen = torch.Generator().manual_seed(3)
    n, width = 5, 96
    y = torch.randn(2 * n + 1, width + num_split, generator=gen)  # then the split channels' residual outputs
    residual_of = None
    if num_split:
        residual_of = torch.full((width,), -1, dtype=torch.int32)
        residual_of[torch.randperm(width, generator=gen)[:num_split].sort().values] = \
            torch.arange(width, width + num_split, dtype=torch.int32)
    scales = torch.rand(n + 3, generator=gen)
    bias = torch.randn(width, generator=gen) if with_bias else None
    residual = torch.randn(n, width, generator=gen)
    got, want = residual.clone(), residual.clone()
    rowscale.finish(y, scales, bias, got, accumulate, residual_of)
    ref.finish(y, scales, bias, want, accumulate, residual_of)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if num_split:  # a channel's residual output really lands in it (and only there)
        bumped = y.clone()
        channel = int((residual_of >= 0).nonzero()[0])
        bumped[1:, residual_of[channel]] += 1.0
        again = residual.clone()
        rowscale.finish(bumped, scales, bias, again, accumulate, residual_of)
        changed = (again != got).any(dim=0).nonzero().squeeze(1).tolist()
        assert changed == [channel], changed


def test_rows_are_bit_identical_alone_and_batched():
    x = _rows(12, 576, 4)
    norm_weight = torch.rand(576, generator=torch.Generator().manual_seed(5)) + 0.5
    batched, batched_scales = _prep(rowscale.prep, x, norm_weight)
    n = x.shape[0]
    for i in range(n):
        alone, alone_scales = _prep(rowscale.prep, x[i : i + 1], norm_weight)
        assert torch.equal(alone[1], batched[1 + i]) and torch.equal(alone[2], batched[1 + n + i])
        assert torch.equal(alone_scales[0], batched_scales[i])


def test_strided_input_rows():
    """x may be a column slice of a wider tensor (rows not contiguous with each other)."""
    wide = _rows(4, 1600, 6)
    x = wide[:, :576]
    got, got_scales = _prep(rowscale.prep, x, None)
    want, want_scales = _prep(ref.prep, x.contiguous(), None)
    assert torch.equal(got, want) and torch.equal(got_scales, want_scales)
