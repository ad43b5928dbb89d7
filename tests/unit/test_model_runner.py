"""ModelRunner on a tiny random Llama: chunked prefill, decode, ragged batches, drafts, and HF parity.

Blocks are allocated by hand (the KV cache manager is another module): each request takes fresh
blocks from a shared counter, interleaved across requests so paging is exercised.
"""
from __future__ import annotations

import pytest
import torch

from engine.config import CacheConfig, ModelConfig
from engine.model_runner import ModelRunner, request_layout
from engine.types import DraftTree, Request, SamplingParams, ScheduledRequest, SchedulerOutput
from specd_kernels.f32_matmul import cpu as f32_matmul
from tests.conftest import make_tiny_model

BLOCK_SIZE = 4
ATOL = 2e-5  # fp32 matmuls round differently by row count (MKL/oneDNN pick kernels by M): ~1e-5 on logits


class _Blocks:
    """A trivial allocator: hands out block ids in a scrambled order."""

    def __init__(self, num_blocks: int):
        self._ids = iter(sorted(range(num_blocks), key=lambda b: (b * 37) % num_blocks))

    def request(self, rid: str, token_ids: list[int], extra: int = 8) -> Request:
        num = -(-(len(token_ids) + extra) // BLOCK_SIZE)
        return Request(rid, list(token_ids), len(token_ids), SamplingParams(),
                       block_ids=[next(self._ids) for _ in range(num)])


@pytest.fixture(scope="module", params=["dense", "onednn", "f32_matmul"])
def runner(request, tiny_model_dir) -> ModelRunner:
    if request.param == "f32_matmul" and f32_matmul.load() is None:
        pytest.skip("specd_kernels/f32_matmul needs a C compiler and AVX2 + FMA")
    cfg = ModelConfig.from_hf_dir(tiny_model_dir)
    return ModelRunner(cfg, tiny_model_dir, CacheConfig(BLOCK_SIZE, 4096), linear_backend=request.param)


@pytest.fixture()
def blocks(runner) -> _Blocks:
    # A fresh scramble per test over the whole pool: earlier tests' K/V is stale garbage, as in serving.
    return _Blocks(runner.cache_config.num_blocks)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _step(runner, *pairs) -> torch.Tensor:
    """Run one step of (request, num_new_tokens[, draft]) and advance the requests like the engine."""
    scheduled = [ScheduledRequest(*p) for p in pairs]
    out = runner.execute(SchedulerOutput(scheduled))
    for s in scheduled:
        s.request.num_computed_tokens += s.num_new_tokens
    return out.logits


def _token_by_token(runner, req: Request) -> torch.Tensor:
    """Logits after every token, decoding one token per step."""
    rows = []
    for _ in range(req.num_tokens):
        req.token_ids, full = req.token_ids[: req.num_computed_tokens + 1], req.token_ids
        rows.append(_step(runner, (req, 1)))
        req.token_ids = full
    return torch.cat(rows)


def test_one_step_equals_chunks_equals_decode(runner, blocks):
    prompt = _prompt(37, 0)
    whole = _step(runner, (blocks.request("a", prompt), 37))
    chunked = blocks.request("b", prompt)
    assert _step(runner, (chunked, 10)).shape[0] == 0  # not at the end: nothing sampled
    assert _step(runner, (chunked, 16)).shape[0] == 0
    last = _step(runner, (chunked, 11))
    decoded = _token_by_token(runner, blocks.request("c", prompt))
    assert whole.shape == (1, 49152) and whole.dtype == torch.float32
    torch.testing.assert_close(last, whole, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(decoded[-1:], whole, atol=ATOL, rtol=ATOL)


def test_matches_hf_at_every_position(runner, blocks, tiny_model_dir):
    from transformers import LlamaForCausalLM

    prompt = _prompt(29, 1)
    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    ours = _token_by_token(runner, blocks.request("hf", prompt))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_ragged_batch_equals_each_alone(runner, blocks):
    prompts = [_prompt(n, 10 + n) for n in (23, 41, 9)]
    alone = []
    for i, p in enumerate(prompts):  # a: 23 in one step; b: 30 then 11; c: 8 then 1 (decode)
        r = blocks.request(f"alone{i}", p)
        if i == 1:
            _step(runner, (r, 30))
        if i == 2:
            _step(runner, (r, 8))
        alone.append(_step(runner, (r, r.num_tokens - r.num_computed_tokens)))
    a, b, c = (blocks.request(f"batch{i}", p) for i, p in enumerate(prompts))
    first = _step(runner, (b, 30), (c, 8))  # neither samples
    assert first.shape[0] == 0
    batched = _step(runner, (a, 23), (b, 11), (c, 1))
    torch.testing.assert_close(batched, torch.cat(alone), atol=ATOL, rtol=ATOL)


def test_zero_token_requests_and_empty_steps(runner, blocks):
    r = blocks.request("z", _prompt(5, 3))
    out = runner.execute(SchedulerOutput([ScheduledRequest(r, 0)]))
    assert out.logits.shape == (0, 49152)
    assert runner.execute(SchedulerOutput([])).logits.shape == (0, 49152)
    alone = _step(runner, (blocks.request("z2", _prompt(5, 3)), 5))
    mixed = _step(runner, (blocks.request("z3", _prompt(7, 4)), 0), (r, 5))
    torch.testing.assert_close(mixed, alone, atol=ATOL, rtol=ATOL)


def test_chain_and_tree_drafts_score_like_sequential_decoding(runner, blocks):
    prompt = _prompt(18, 5)
    # Two branches after the prompt: [x, y, z] and [x, w]; plus a sibling v of x.
    x, y, z, w, v = _prompt(5, 6)
    draft = DraftTree([x, y, z, w, v], [-1, 0, 1, 0, -1])
    req = blocks.request("tree", prompt)
    _step(runner, (req, 17))
    logits = _step(runner, (req, 1, draft))  # rows: last prompt token, then the 5 nodes
    assert logits.shape[0] == 6
    paths = {1: [x], 2: [x, y], 3: [x, y, z], 4: [x, w], 5: [v]}
    for row, path in paths.items():
        ref = _token_by_token(runner, blocks.request(f"path{row}", prompt + path))
        torch.testing.assert_close(logits[row], ref[-1], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(logits[0], ref[len(prompt) - 1], atol=ATOL, rtol=ATOL)
    chain = blocks.request("chain", prompt)
    _step(runner, (chain, 17))
    chain_logits = _step(runner, (chain, 1, DraftTree([x, y, z], [-1, 0, 1])))
    torch.testing.assert_close(chain_logits[1:], logits[1:4], atol=ATOL, rtol=ATOL)


def test_layout_helper_positions_and_tree():
    req = Request("l", list(range(10)), 10, SamplingParams(), num_computed_tokens=9, block_ids=[0, 1, 2])
    lay = request_layout(ScheduledRequest(req, 1, DraftTree([7, 8, 9], [-1, 0, -1])))
    assert lay.token_ids == [9, 7, 8, 9]
    assert lay.positions == [9, 10, 11, 10]
    assert lay.cache_indices == [9, 10, 11, 12]
    assert lay.kv_len == 13 and lay.sample_rows == [0, 1, 2, 3]
    assert lay.tree_block == [[True, False, False, False], [True, True, False, False],
                              [True, True, True, False], [True, False, False, True]]


def test_bias_model_matches_hf(tmp_path, default_model_dir):
    """attention_bias (Qwen2-style q/k/v bias; Llama's flag also biases o_proj) and an untied lm_head."""
    from transformers import LlamaForCausalLM

    model_dir = make_tiny_model(tmp_path / "bias", default_model_dir, seed=3, attention_bias=True,
                                tie_word_embeddings=False, num_key_value_heads=1)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    hf.save_pretrained(model_dir)  # HF inits biases to 0: make them count, so a dropped one fails
    cfg = ModelConfig.from_hf_dir(model_dir)
    runner = ModelRunner(cfg, model_dir, CacheConfig(BLOCK_SIZE, 256))
    prompt = _prompt(13, 8)
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1:]
    r = Request("b", prompt, 13, SamplingParams(), block_ids=list(range(4)))
    torch.testing.assert_close(runner.execute(SchedulerOutput([ScheduledRequest(r, 13)])).logits, expected,
                               atol=1e-4, rtol=1e-4)


def test_rejects_missing_blocks(runner):
    r = Request("nb", _prompt(9, 9), 9, SamplingParams(), block_ids=[0])
    with pytest.raises(ValueError):
        runner.execute(SchedulerOutput([ScheduledRequest(r, 9)]))


def test_runner_exposes_device_dtype_config(runner, tiny_model_dir):
    assert runner.device == torch.device("cpu") and runner.dtype == torch.float32
    assert runner.model_config == ModelConfig.from_hf_dir(tiny_model_dir)
    assert len(runner.kv_caches) == runner.model_config.num_layers


def test_fp32_steps_plan_the_c_attention_kernel(runner, blocks):
    """fp32 models attend through specd_kernels/attention/cpu.c (faster than SDPA here, and row-exact)
    whenever it builds; the tests above hold its outputs to HF and to sequential decoding."""
    from specd_kernels.attention import cpu

    req = blocks.request("p", _prompt(9, 5))
    plan = runner.prepare_inputs(SchedulerOutput([ScheduledRequest(req, 9)])).attn_metadata.plan
    assert isinstance(plan, cpu.CpuPlan) == (cpu.load() is not None)


def test_kv_cache_dtype_follows_the_flag_and_the_dtype():
    """auto: fp16 K/V for the int8 dtypes where the C kernels convert it, the activations' dtype
    otherwise (fp32 stays HF-exact); an explicit dtype other than fp32 activations' is refused."""
    from engine.model_runner import kv_cache_dtype
    from specd_kernels.rope.cpu import kv_half_supported

    cpu = torch.device("cpu")
    assert kv_cache_dtype("auto", "fp32", cpu) == torch.float32
    assert kv_cache_dtype("auto", "int8", cpu) == (torch.float16 if kv_half_supported() else torch.float32)
    assert kv_cache_dtype("auto", "int8", torch.device("cuda")) == torch.float32
    assert kv_cache_dtype("fp32", "int8", cpu) == torch.float32
    assert kv_cache_dtype("fp16", "fp32", cpu) == torch.float16
    assert kv_cache_dtype("auto", "bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="needs fp32 activations"):
        kv_cache_dtype("fp16", "bf16", cpu)
    with pytest.raises(ValueError, match="kv cache dtype"):
        CacheConfig(dtype="int8")


def test_an_fp16_cache_serves_fp32_activations(tiny_model_dir):
    """--dtype fp32 --kv-cache-dtype fp16: the cache holds fp16, and logits stay close to fp32's."""
    cfg = ModelConfig.from_hf_dir(tiny_model_dir)
    runners = [ModelRunner(cfg, tiny_model_dir, CacheConfig(BLOCK_SIZE, 1024, kv)) for kv in ("fp32", "fp16")]
    assert runners[1].kv_caches[0][0].dtype == torch.float16
    logits = []
    for runner in runners:
        req = _Blocks(runner.cache_config.num_blocks).request("r", _prompt(20, 9))
        logits.append(_step(runner, (req, 20)))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-2, rtol=1e-2)


def test_padding_slots_move_cache_indices_not_positions():
    """--spec-layout padded-kv: hidden padding slots sit in the cache between tokens, so a token's
    cache index runs ahead of its RoPE position by the padding before it."""
    req = Request("p", list(range(12)), 4, SamplingParams(), num_computed_tokens=11, kv_padding=[6, 7, 9])
    assert req.num_cache_slots == 14
    lay = request_layout(ScheduledRequest(req, 1, DraftTree([5, 6], [-1, 0])))
    assert lay.positions == [11, 12, 13]
    assert lay.cache_indices == [14, 15, 16] and lay.kv_len == 17


@pytest.mark.parametrize("flags, message", [
    (dict(spec_layout="padded-kv", device="cuda"), "CPU attention kernels only"),
    (dict(spec="pass", spec_layout="padded-kv"), "not available with --spec-layout padded-kv"),
    (dict(spec_layout="unpadded"), "ragged, padded, padded-kv"),
])
def test_spec_layout_is_checked(flags, message):
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig(**flags)
