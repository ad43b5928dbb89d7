"""specd_kernels/bf16_rows: RMSNorm and SwiGLU into bf16 rows, against the reference (ref.py) and row by row."""
from __future__ import annotations

import shutil

import pytest
import torch

from specd_kernels import cbuild
from specd_kernels.bf16_rows import cpu, ref

pytestmark = pytest.mark.skipif(shutil.which(cbuild.compiler()) is None, reason="no C compiler")


@pytest.fixture(scope="module")
def lib():
    lib = cpu.load()
    assert lib is not None, "a C compiler is here, so the kernels must build"
    return lib


def _rows(n: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=gen) * torch.logspace(-3, 2, n)[:, None]


def _norm(lib, x, weight):
    return cpu.rms_norm_bf16(lib, x, weight, 1e-5, torch.empty(x.shape, dtype=torch.bfloat16))


def _swiglu(lib, y):
    return cpu.swiglu_bf16(lib, y, torch.empty(y.shape[0], y.shape[1] // 2, dtype=torch.bfloat16))


def _within_one_step(out: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 rounding of an fp32 result against that of an fp64 one: equal, or one bf16 step apart (or
    both below 1e-30: the kernels' e^x stops at e^-87, so silu(-90) comes out -1e-36, not -7e-38)."""
    step = (expected.float().abs() * 2.0**-7).clamp_min(1e-30)
    assert ((out.float() - expected.float()).abs() <= step).all()
    normal = expected.float().abs() > 1e-30
    assert (out == expected)[normal].float().mean() > 0.99


def test_rms_norm_matches_the_reference(lib):
    x, weight = _rows(37, 576, 1), torch.rand(576) + 0.5
    _within_one_step(_norm(lib, x, weight), ref.rms_norm_bf16(x, weight, 1e-5))


def test_swiglu_matches_the_reference_over_the_whole_range(lib):
    y = (_rows(37, 2 * 1536, 2) * 3).to(torch.bfloat16)
    y[0, :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-30, -1e-30, 0.5, -0.5]).to(torch.bfloat16)
    _within_one_step(_swiglu(lib, y), ref.swiglu_bf16(y))


def test_a_row_has_its_bits_alone_and_in_any_batch(lib):
    x, weight = _rows(37, 576, 3), torch.rand(576) + 0.5
    y = (_rows(37, 2 * 512, 4)).to(torch.bfloat16)
    normed, act = _norm(lib, x, weight), _swiglu(lib, y)
    for r in (0, 5, 36):
        assert torch.equal(_norm(lib, x[r : r + 1], weight), normed[r : r + 1])
        assert torch.equal(_swiglu(lib, y[r : r + 1]), act[r : r + 1])
    strided = torch.cat([y, y], dim=1)[:, : y.shape[1]]  # rows of a wider buffer, as oneDNN's output slices
    assert torch.equal(_swiglu(lib, strided), act)
