"""engine/models/linear.py: int8 models run prompt rows through a dense oneDNN linear (fp32, or bf16
in calls of 64-192 rows) and every other row through int8; each row's bits depend only on its token's
role, never on the rest of the step. engine/model_runner.py runs a step mixing both as two forwards."""
from __future__ import annotations

import pytest
import torch

from engine.config import CacheConfig, ModelConfig
from engine.model_runner import ModelRunner
from engine.models import linear
from engine.models.int8 import quantize_weight
from engine.types import DraftTree, Request, SamplingParams, ScheduledRequest, SchedulerOutput

BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
PROMPT_LINEARS = [linear.PROMPT_FP32, pytest.param(linear.PROMPT_BF16, marks=pytest.mark.skipif(
    not BF16, reason="oneDNN has no bf16 on this CPU"))]


def test_rows_exact_check_catches_a_batch_dependent_linear(monkeypatch):
    weights = [torch.randn(64, 32)]
    assert linear.onednn_rows_exact(weights)  # oneDNN's packed fp32 linear on this machine
    batch_dependent = lambda x, w, b: torch.nn.functional.linear(x, w) + 1e-3 * x.shape[0]  # noqa: E731
    monkeypatch.setattr(linear, "onednn_linear", batch_dependent)
    assert not linear.onednn_rows_exact(weights)


def test_a_lone_prompt_row_has_the_bits_it_has_among_others():
    """oneDNN took another kernel for one row of a 576x1536 layer on an AVX-512 host (other bits);
    the prompt rows' linear never gives it one row."""
    gen = torch.Generator().manual_seed(1)
    packed = linear.pack_onednn(torch.randn(576, 1536, generator=gen) / 40)
    x = torch.randn(40, 1536, generator=gen)
    together = linear.onednn_linear_two_rows(x, packed, None)
    for row in range(40):
        assert torch.equal(linear.onednn_linear_two_rows(x[row : row + 1], packed, None), together[row : row + 1])


@pytest.mark.skipif(not BF16, reason="oneDNN has no bf16 on this CPU")
def test_bf16_blocks_give_a_row_its_bits_whatever_came_with_it():
    """oneDNN's bf16 rows depend on the call's row count (1-47, 256 and 300 rows differed from 64 on
    an AMX host, 64-192 did not); calls of 64-192 rows do not, and stay within bf16's rounding of fp32."""
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(96, 576, generator=gen) / 24, torch.randn(576, 1536, generator=gen) / 40]
    assert linear.onednn_rows_exact(weights, linear.PROMPT_BF16)
    for w in weights:
        x = torch.randn(150, w.shape[1], generator=gen)
        y = linear.onednn_bf16_blocks(x, linear.pack_onednn_bf16(w), None)
        ref = torch.nn.functional.linear(x, w)
        assert y.dtype == torch.float32 and y.shape == ref.shape
        assert (y - ref).abs().max() < 2e-2 * ref.abs().max()
    bias = torch.randn(96, generator=gen)
    x = torch.randn(3, 576, generator=gen)
    packed = linear.pack_onednn_bf16(weights[0])
    assert torch.equal(linear.onednn_bf16_blocks(x, packed, bias), linear.onednn_bf16_blocks(x, packed, None) + bias)


@pytest.mark.parametrize("rows", [1, 63, 64, 150, 192, 193, 256, 300, 385, 1000])
def test_bf16_calls_cover_the_rows_in_64_to_192_row_calls(rows):
    sizes = linear.bf16_call_rows(rows)
    assert sum(sizes) == max(rows, 64) and all(64 <= s <= 192 for s in sizes)
    assert len(sizes) == -(-rows // 192) and max(sizes) - min(sizes) <= 1 + max(0, 64 - rows)


def test_the_prompt_linear_chosen_is_row_exact():
    weights = [torch.randn(64, 32), torch.randn(32, 64)]
    choice = linear.choose_prompt_linear(weights)
    assert choice in (linear.PROMPT_FP32, linear.PROMPT_BF16)
    assert linear.onednn_rows_exact(weights, choice)


@pytest.mark.parametrize("prompt_linear", PROMPT_LINEARS)
@pytest.mark.parametrize("fused", [False, True])
def test_mixed_rows_take_their_own_path_with_the_same_bits_as_alone(fused, prompt_linear):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=gen) * 0.1
    weight = linear.HybridWeight(prompt_linear.pack(w), quantize_weight(w, 1.0))
    x = torch.randn(7, 32, generator=gen)
    prompt = torch.tensor([True, True, False, True, False, False, True])
    norm = (torch.rand(32, generator=gen) + 0.5, 1e-5) if fused else None
    residual = torch.randn(7, 48, generator=gen) if fused else None
    layer = linear.PromptRowsDense(prompt_linear)

    def run(rows_mask, rows):
        layer.set_rows(rows_mask)
        return layer(x[rows], weight, None, norm, None if residual is None else residual[rows].clone())

    layer.set_rows(prompt)
    mixed = layer(x, weight, None, norm, None if residual is None else residual.clone())
    for row in range(7):
        alone = run(prompt[row : row + 1], slice(row, row + 1))
        assert torch.equal(mixed[row : row + 1], alone), f"row {row}"
    dense = run(torch.ones(7, dtype=torch.bool), slice(None))
    int8 = run(None, slice(None))
    assert torch.equal(mixed[prompt], dense[prompt]) and torch.equal(mixed[~prompt], int8[~prompt])
    assert not torch.equal(dense, int8)


@pytest.mark.skipif(not BF16, reason="oneDNN has no bf16 on this CPU")
def test_the_fused_swiglu_block_gives_each_row_its_bits_in_any_mix():
    """bf16 prompt rows' SwiGLU block runs fused (onednn_bf16_mlp), in an all-prompt step and among int8
    rows alike; int8 rows keep the per-linear block."""
    gen = torch.Generator().manual_seed(5)
    hidden, inter = 64, 96
    w_gate_up = torch.randn(2 * inter, hidden, generator=gen) / 8
    w_down = torch.randn(hidden, inter, generator=gen) / 10
    gate_up = linear.HybridWeight(linear.PROMPT_BF16.pack(w_gate_up), quantize_weight(w_gate_up, 1.0))
    down = linear.HybridWeight(linear.PROMPT_BF16.pack(w_down), quantize_weight(w_down, 1.0))
    norm = (torch.rand(hidden, generator=gen) + 0.5, 1e-5)
    x = torch.randn(7, hidden, generator=gen)
    prompt = torch.tensor([True, False, True, True, False, False, True])
    layer = linear.PromptRowsDense(linear.PROMPT_BF16)

    def block(rows_mask, rows):
        layer.set_rows(rows_mask)
        return layer.mlp(x[rows].clone(), gate_up, down, norm, inter)

    mixed = block(prompt, slice(None))
    for row in range(7):
        assert torch.equal(block(prompt[row : row + 1], slice(row, row + 1)), mixed[row : row + 1]), f"row {row}"
    assert torch.equal(mixed[prompt], block(torch.ones(4, dtype=torch.bool), prompt))
    int8_rows = linear.swiglu_block(layer.int8, x[~prompt].clone(), gate_up.int8, down.int8, norm, inter)
    assert torch.equal(mixed[~prompt], int8_rows)
    normed = torch.nn.functional.rms_norm(x, (hidden,), *norm)
    gate, up = (normed @ w_gate_up.T).chunk(2, dim=1)
    exact = x + (torch.nn.functional.silu(gate) * up) @ w_down.T
    assert (mixed - exact).abs().max() < 3e-2 * exact.abs().max()


def test_model_routes_by_role_and_a_decode_row_is_the_same_next_to_a_prefill(tiny_model_dir):
    runner = ModelRunner(ModelConfig.from_hf_dir(tiny_model_dir), tiny_model_dir, CacheConfig(4, 1024), dtype="int8")
    assert runner.model.prompt_rows_dense
    blocks = iter(range(256))
    gen = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, 49152, (n,), generator=gen).tolist()  # noqa: E731

    def request(name, tokens, num_prompt):
        return Request(name, tokens, num_prompt, SamplingParams(), block_ids=[next(blocks) for _ in range(12)])

    # a recomputed request (preempted after 3 output tokens): its output tokens stay on the int8 path
    again = request("again", ids(9), 6)
    meta = runner.prepare_inputs(SchedulerOutput([ScheduledRequest(again, 9)])).attn_metadata
    assert meta.prompt_rows.tolist() == [True] * 6 + [False] * 3

    decoding = request("d", ids(10), 9)
    runner.execute(SchedulerOutput([ScheduledRequest(decoding, 9)]))
    decoding.num_computed_tokens = 9
    alone = runner.execute(SchedulerOutput([ScheduledRequest(decoding, 1)])).logits
    prompt = ids(14)
    first = request("p1", prompt, 14)
    prefill_alone = runner.execute(SchedulerOutput([ScheduledRequest(first, 14)])).logits
    second = request("p2", prompt, 14)
    mixed = runner.execute(SchedulerOutput([ScheduledRequest(second, 14), ScheduledRequest(decoding, 1)])).logits
    assert torch.equal(mixed[0:1], prefill_alone) and torch.equal(mixed[1:2], alone)
    as_generated = request("g", prompt, 0)  # the same tokens on the int8 path give other bits
    assert not torch.equal(runner.execute(SchedulerOutput([ScheduledRequest(as_generated, 14)])).logits, prefill_alone)


def test_a_step_mixing_prompts_with_drafts_runs_as_two_forwards_in_scheduled_order(tiny_model_dir, monkeypatch):
    """Prompt chunks in one forward, decoding/verification (drafts, look-ahead rows) in another; the
    merged output is each request's rows in scheduled order, with the bits each request gets alone."""
    cfg = ModelConfig.from_hf_dir(tiny_model_dir)
    runner = ModelRunner(cfg, tiny_model_dir, CacheConfig(4, 1024), dtype="int8")
    runner.set_lookahead(torch.randn(2, cfg.hidden_size, generator=torch.Generator().manual_seed(5)))
    blocks = iter(range(256))
    gen = torch.Generator().manual_seed(4)
    ids = lambda n: torch.randint(3, 49152, (n,), generator=gen).tolist()  # noqa: E731

    def decoding(name):
        r = Request(name, ids(10), 9, SamplingParams(), block_ids=[next(blocks) for _ in range(8)])
        runner.execute(SchedulerOutput([ScheduledRequest(r, 9)]))
        r.num_computed_tokens = 9
        return r

    verify = ScheduledRequest(decoding("v"), 1, DraftTree(ids(2), [-1, 0]), max_draft_tokens=5, num_lookahead=1)
    plain = ScheduledRequest(decoding("d"), 1)
    whole = ScheduledRequest(Request("p", ids(11), 11, SamplingParams(), block_ids=[next(blocks) for _ in range(8)]), 11)
    chunk = ScheduledRequest(Request("c", ids(12), 12, SamplingParams(), block_ids=[next(blocks) for _ in range(8)]), 5)
    step = [verify, whole, chunk, plain]
    forwards = []
    forward = runner.model.forward
    monkeypatch.setattr(runner.model, "forward", lambda *a, **k: forwards.append(a[0].numel()) or forward(*a, **k))
    mixed = runner.execute(SchedulerOutput(step))
    assert forwards == [11 + 5, 4 + 1]  # the prompt chunks, then the decoding rows (1 + 2 drafts + 1 look-ahead, 1)
    alone = [runner.execute(SchedulerOutput([s])) for s in step]
    assert mixed.logits.shape[0] == 3 + 1 + 0 + 1
    assert torch.equal(mixed.logits, torch.cat([out.logits for out in alone]))
    assert torch.equal(mixed.hidden_states, torch.cat([out.hidden_states for out in alone]))
    assert torch.equal(mixed.lookahead_logits, alone[0].lookahead_logits)
