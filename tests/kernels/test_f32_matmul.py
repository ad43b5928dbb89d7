"""specd_kernels/f32_matmul: the fp32 weight-stationary matmul (cpu.c) against torch (ref.py), and a row's
bits alone and among any other rows, on the AVX-512 and the AVX2 path alike."""
from __future__ import annotations

import platform
import shutil

import pytest
import torch

from engine.models import linear
from specd_kernels import cbuild
from specd_kernels.f32_matmul import cpu, ref

LIB = cpu.load()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler, or no AVX2 + FMA on this CPU")

# (out features, in features): the default model's layers, and widths off the panel and block sizes
SHAPES = [(960, 576), (3072, 576), (576, 1536), (100, 70), (33, 130), (16, 1), (1, 5)]


def _matrices(rows: int, n: int, k: int, seed: int, integer: bool = False):
    gen = torch.Generator().manual_seed(seed)
    if integer:  # small integers: every sum is exact in fp32, so any order must give ref's bits
        return (torch.randint(-4, 5, (rows, k), generator=gen).float(),
                torch.randint(-4, 5, (n, k), generator=gen).float())
    return torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5


def test_packing_pads_the_last_panel_with_zeros():
    weight = torch.arange(33 * 5, dtype=torch.float32).view(33, 5)
    packed = cpu.pack(weight)
    assert packed.panels.shape == (3, 5, 16) and (packed.n, packed.k) == (33, 5)
    assert torch.equal(packed.panels[1, 2], weight[16:32, 2])
    assert torch.equal(packed.panels[2, :, 0], weight[32]) and not packed.panels[2, :, 1:].any()


@needs_lib
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 64])
def test_exact_on_integers_and_within_rounding_of_torch(n, k, rows):
    x, w = _matrices(rows, n, k, seed=n + k + rows, integer=True)
    assert torch.equal(cpu.f32_matmul(LIB, x, cpu.pack(w)), ref.f32_matmul(x, w))
    x, w = _matrices(rows, n, k, seed=n * k + rows)
    exact = x.double() @ w.double().T
    bound = 1e-6 * k * (x.abs().double() @ w.abs().double().T).max() + 1e-30
    assert (cpu.f32_matmul(LIB, x, cpu.pack(w)).double() - exact).abs().max() <= bound


@needs_lib
@pytest.mark.parametrize("n,k", SHAPES[:3] + [(33, 130)])
def test_a_rows_bits_never_depend_on_the_other_rows(n, k):
    x, w = _matrices(70, n, k, seed=7)
    packed = cpu.pack(w)
    whole = cpu.f32_matmul(LIB, x, packed)
    for size in (1, 2, 5, 7, 8, 9, 16, 23, 35):
        parts = torch.cat([cpu.f32_matmul(LIB, x[i : i + size], packed) for i in range(0, 70, size)])
        assert torch.equal(parts, whole), size


@needs_lib
def test_output_rows_may_be_strided_and_empty_inputs_are_fine():
    x, w = _matrices(5, 40, 24, seed=3)
    packed = cpu.pack(w)
    wide = torch.full((5, 64), 7.0)
    cpu.f32_matmul(LIB, x, packed, out=wide[:, 10:50])
    assert torch.equal(wide[:, 10:50], cpu.f32_matmul(LIB, x, packed))
    assert (wide[:, :10] == 7).all() and (wide[:, 50:] == 7).all()
    assert cpu.f32_matmul(LIB, x[:0], packed).shape == (0, 40)
    assert torch.equal(cpu.f32_matmul(LIB, x.T.contiguous().T, packed), cpu.f32_matmul(LIB, x, packed))


@needs_lib
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_rms_norm_and_residual_in_the_same_call(rows):
    """The accumulated output has the bits of adding the plain output afterwards; the fused RMSNorm is
    torch's within rounding, and row by row."""
    x, w = _matrices(rows, 40, 24, seed=rows)
    packed, norm = cpu.pack(w), (torch.rand(24) + 0.5, 1e-5)
    residual = torch.randn(rows, 40)
    summed = cpu.f32_matmul(LIB, x, packed, out=residual.clone(), accumulate=True)
    assert torch.equal(summed, residual + cpu.f32_matmul(LIB, x, packed))
    normed = cpu.f32_matmul(LIB, x, packed, norm=norm)
    expected = torch.nn.functional.rms_norm(x, (24,), *norm) @ w.T
    assert (normed - expected).abs().max() < 1e-5 * expected.abs().max()
    assert torch.equal(torch.cat([cpu.f32_matmul(LIB, x[r : r + 1], packed, norm=norm) for r in range(rows)]), normed)
    linear_fn = linear.fp32_backend("f32_matmul")[1]
    out = residual.clone()
    assert linear_fn(x, packed, None, norm=norm, residual=out) is out
    assert torch.equal(out, residual + normed)


@needs_lib
def test_the_engine_linear_takes_a_bias_and_is_one_of_the_measured_backends():
    x, w = _matrices(4, 48, 32, seed=4)
    bias = torch.randn(48)
    pack, matmul = linear.fp32_backend("f32_matmul")
    assert torch.allclose(matmul(x, pack(w), bias), torch.nn.functional.linear(x, w, bias), atol=1e-5)
    assert linear.measure_backends([w, torch.randn(64, 48)], reps=1) in linear.FP32_BACKENDS


@needs_lib
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which(cbuild.compiler()) is None,
                    reason="the AVX2 path is x86's")
def test_the_avx2_path_gives_the_avx512_paths_bits(tmp_path, monkeypatch):
    """CI may run on a CPU without AVX-512: the kernel there must give the same bits as here."""
    wrapper = tmp_path / "cc-avx2"
    wrapper.write_text(f'#!/bin/sh\nexec {cbuild.compiler()} "$@" -mno-avx512f\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("SPECD_CACHE", str(tmp_path / "cache"))
    cbuild.load.cache_clear()
    try:
        avx2 = cpu.load()
    finally:
        cbuild.load.cache_clear()
    assert avx2 is not None
    for n, k in SHAPES:
        x, w = _matrices(13, n, k, seed=n)
        packed = cpu.pack(w)
        assert torch.equal(cpu.f32_matmul(avx2, x, packed), cpu.f32_matmul(LIB, x, packed)), (n, k)
