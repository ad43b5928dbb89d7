"""int8 linear layers: per-row activation scales make every row independent of the rest of the batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.int8 import RowScaledInt8Linear, dequantize_weight, quantize_weight
from specd_kernels import backend


@pytest.fixture(autouse=True, params=["auto", "ref"])
def rowscale_backend(request):
    """Every test runs with the C row-scaling kernels (auto) and with their torch reference."""
    previous = backend.get_backend()
    backend.set_backend(request.param)
    yield request.param
    backend.set_backend(previous)


def _inputs(rows: int, width: int, seed: int) -> torch.Tensor:
    """Rows whose magnitudes differ by orders of magnitude, as hidden states of different tokens do."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen)
    return x * torch.logspace(-3, 2, rows)[torch.randperm(rows, generator=gen)][:, None]


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=gen) * 0.1
    bias = torch.randn(96, generator=gen)
    return weight, bias


@pytest.mark.parametrize("split_share", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_each_row_is_bit_identical_alone_and_in_any_batch(layer, with_bias, split_share):
    weight, bias = layer
    bias = bias if with_bias else None
    packed = quantize_weight(weight, split_share)
    linear = RowScaledInt8Linear()
    x = _inputs(16, 64, 1)
    x[5] = 0.0  # an all-zero row must not poison the others (or itself)
    batched = linear(x, packed, bias)
    for i in range(16):
        assert torch.equal(linear(x[i : i + 1], packed, bias), batched[i : i + 1]), f"row {i} differs alone"
    # In another company: the same row next to rows 100x larger gives the same bits.
    crowd = torch.cat([x[3:4], _inputs(7, 64, 2) * 100])
    assert torch.equal(linear(crowd, packed, bias)[0], batched[3])
    assert torch.equal(batched[5], torch.zeros(96) if bias is None else bias)


def test_close_to_fp32_and_to_its_own_dequantized_weights(layer):
    weight, bias = layer
    x = _inputs(16, 64, 3)
    exact = F.linear(x, weight, bias)
    errors = {}
    for share in (0.0, 0.5, 1.0):
        packed = quantize_weight(weight, share)
        ours = RowScaledInt8Linear()(x, packed, bias)
        errors[share] = ((ours - exact).norm(dim=1) / exact.norm(dim=1)).max()
        wq = dequantize_weight(packed)
        itself = F.linear(x, wq, bias)  # what it multiplies by, but for the activations' rounding
        assert ((ours - itself).norm(dim=1) / itself.norm(dim=1)).max() < 1e-3
        whole_step = weight.abs().amax(1) / 127  # per channel
        split = packed.residual_of >= 0 if packed.residual_of is not None else torch.zeros(96, dtype=torch.bool)
        assert int(split.sum()) == round(share * 96)
        step = torch.where(split, whole_step / 127, whole_step)  # a split channel: its residual's own step
        assert ((wq - weight).abs().amax(1) <= step / 2 + 1e-6).all()
    assert errors[0.0] < 0.01  # two-pass (~13-bit) activations, 8-bit per-channel weights
    assert errors[1.0] < errors[0.0] / 4, errors  # the split leaves mostly the activations' rounding
    assert errors[1.0] < errors[0.5] < errors[0.0], errors


def test_a_partial_split_takes_the_channels_with_the_largest_rounding_error(layer):
    weight, _ = layer
    whole, half = dequantize_weight(quantize_weight(weight)), quantize_weight(weight, 0.5)
    error = (weight - whole).norm(dim=1)
    split = half.residual_of >= 0
    assert error[split].min() >= error[~split].max()
    # The residual rows follow the whole rows, in channel order.
    assert half.residual_of[split].tolist() == list(range(96, 96 + int(split.sum())))


def test_buffers_grow_and_are_reused(layer):
    weight, _ = layer
    packed = quantize_weight(weight)
    linear = RowScaledInt8Linear()
    small = linear(_inputs(2, 64, 4), packed, None)
    big_x = _inputs(300, 64, 5)
    big = linear(big_x, packed, None)
    assert big.shape == (300, 96) and small.shape == (2, 96)
    assert torch.equal(linear(big_x[:2], packed, None), big[:2])


@pytest.mark.parametrize("dtype", ["int8", "int8-fast"])
def test_int8_model_rows_are_identical_alone_and_in_a_ragged_batch(tiny_model_dir, dtype):
    """A whole int8 forward: each request's logits have the same bits alone or batched with others
    (decode rows of different context lengths, the case speculation and continuous batching create)."""
    from engine.config import CacheConfig, ModelConfig
    from engine.model_runner import ModelRunner
    from engine.types import Request, SamplingParams, ScheduledRequest, SchedulerOutput

    runner = ModelRunner(ModelConfig.from_hf_dir(tiny_model_dir), tiny_model_dir, CacheConfig(4, 1024), dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (5, 19, 33, 12)]
    next_block = iter(range(256))

    def prefilled(i, p):
        r = Request(f"r{i}", p + [11], len(p), SamplingParams(), block_ids=[next(next_block) for _ in range(12)])
        runner.execute(SchedulerOutput([ScheduledRequest(r, len(p))]))
        r.num_computed_tokens = len(p)
        return r

    reqs = [prefilled(i, p) for i, p in enumerate(prompts)]
    alone = [runner.execute(SchedulerOutput([ScheduledRequest(r, 1)])).logits for r in reqs]
    batched = runner.execute(SchedulerOutput([ScheduledRequest(r, 1) for r in reqs])).logits
    for i, row in enumerate(alone):
        assert torch.equal(batched[i : i + 1], row), f"request {i}: batched logits differ from alone"


def test_fused_norm_and_residual_match_the_unfused_layer(layer):
    weight, bias = layer
    packed = quantize_weight(weight)
    linear = RowScaledInt8Linear()
    x, residual = _inputs(6, 64, 8), _inputs(6, 96, 9)
    norm_weight = torch.rand(64, generator=torch.Generator().manual_seed(10)) + 0.5
    normed = linear(x, packed, bias, norm=(norm_weight, 1e-5))
    torch.testing.assert_close(normed, linear(F.rms_norm(x, (64,), norm_weight, 1e-5), packed, bias), rtol=1e-4, atol=1e-5)
    expected = residual + linear(x, packed, bias)
    out = linear(x, packed, bias, residual=residual)
    assert out is residual and torch.equal(out, expected)


def test_fbgemm_is_called_through_torchscript_with_the_same_result():
    """The pinned torch has TorchScript, so the per-call pybind11 cost is avoided; the result is the op's own."""
    from engine.models.int8 import _LINEAR_DYNAMIC

    assert isinstance(_LINEAR_DYNAMIC, torch.jit.ScriptFunction)
    weight = quantize_weight(torch.randn(96, 64, generator=torch.Generator().manual_seed(1)) * 0.05)
    x = torch.rand(5, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    direct = torch.ops.quantized.linear_dynamic.default(x, weight.packed, True)
    assert torch.equal(_LINEAR_DYNAMIC(x, weight.packed, True), direct)
