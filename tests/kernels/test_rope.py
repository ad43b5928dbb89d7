"""specd_kernels/rope: the C rotate-and-store against the torch reference (ref.py), bit for bit."""
from __future__ import annotations

import shutil

import pytest
import torch

from specd_kernels import backend, cbuild, rope
from specd_kernels.rope import cpu, ref

pytestmark = pytest.mark.skipif(shutil.which(cbuild.compiler()) is None, reason="no C compiler")

HEADS, KV_HEADS, HEAD_DIM, SLOTS = 9, 3, 64, 64


def _tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    emb = torch.outer(positions.float(), inv_freq).repeat(1, 2)
    sin = emb.sin()
    sin[:, : HEAD_DIM // 2].neg_()
    return emb.cos().contiguous(), sin.contiguous()


def _inputs(num_tokens: int, seed: int, kv_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    # a strided qkv: rows of a wider tensor, as a view into a bigger activation would be
    qkv = torch.randn(num_tokens, width + 7, generator=gen)[:, :width]
    positions = torch.randint(0, 4000, (num_tokens,), generator=gen)
    slots = torch.randperm(SLOTS, generator=gen)[:num_tokens]
    caches = [torch.full((SLOTS // 16, 16, KV_HEADS, HEAD_DIM), float("nan"), dtype=kv_dtype) for _ in range(2)]
    return qkv, *_tables(positions), slots, caches


KV_DTYPES = [torch.float32, pytest.param(torch.float16, marks=pytest.mark.skipif(
    not cpu.kv_half_supported(), reason="no F16C: fp16 caches take the reference"))]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [1, 5, 40])
def test_c_matches_reference_bit_for_bit(num_tokens, kv_dtype):
    """fp16 caches: the C store rounds as torch's .to(torch.float16) does (to nearest even)."""
    assert cpu.load() is not None, "a C compiler is here, so the C kernel must build"
    qkv, cos, sin, slots, (k_ref, v_ref) = _inputs(num_tokens, num_tokens, kv_dtype)
    q_ref = ref.rotate_and_store(qkv.clone(), cos, sin, k_ref, v_ref, slots, HEADS, KV_HEADS)
    _, _, _, _, (k_c, v_c) = _inputs(num_tokens, num_tokens, kv_dtype)
    qkv_c = qkv.clone()
    q_c = rope.rotate_and_store(qkv_c, cos, sin, k_c, v_c, slots, HEADS, KV_HEADS)
    assert q_c.data_ptr() == qkv_c.data_ptr(), "the C path rotates q in place and returns a view"
    assert torch.equal(q_c, q_ref)
    # untouched slots stay NaN in both; written ones agree exactly
    assert torch.equal(k_c.nan_to_num(7.0), k_ref.nan_to_num(7.0))
    assert torch.equal(v_c.nan_to_num(7.0), v_ref.nan_to_num(7.0))


def test_rotation_is_hf_rotate_half():
    qkv, cos, sin, slots, (k_cache, v_cache) = _inputs(3, 0)
    x = qkv[:, : HEADS * HEAD_DIM].reshape(3, HEADS, HEAD_DIM)
    half = HEAD_DIM // 2
    rotate_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    hf_sin = sin.clone()
    hf_sin[:, :half].neg_()
    expected = x * cos[:, None] + rotate_half * hf_sin[:, None]
    assert torch.equal(rope.rotate_and_store(qkv.clone(), cos, sin, k_cache, v_cache, slots, HEADS, KV_HEADS), expected)


def test_slot_out_of_range_is_refused_before_any_write():
    qkv, cos, sin, slots, (k_cache, v_cache) = _inputs(4, 1)
    slots[2] = SLOTS
    before = qkv.clone()
    with pytest.raises(ValueError, match="slot"):
        rope.rotate_and_store(qkv, cos, sin, k_cache, v_cache, slots, HEADS, KV_HEADS)
    assert torch.equal(qkv, before) and k_cache.isnan().all()


@pytest.mark.parametrize("forced", ["ref", "triton"])
def test_forced_backend_skips_c(forced):
    """A forced backend must reach its own store_kv (the Triton dispatch test counts those calls)."""
    if forced == "triton":
        pytest.importorskip("triton")
    previous = backend.get_backend()
    backend.set_backend(forced)
    try:
        qkv, cos, sin, slots, (k_cache, v_cache) = _inputs(2, 3)
        q = rope.rotate_and_store(qkv, cos, sin, k_cache, v_cache, slots, HEADS, KV_HEADS)
        assert q.data_ptr() != qkv.data_ptr()
    finally:
        backend.set_backend(previous)
