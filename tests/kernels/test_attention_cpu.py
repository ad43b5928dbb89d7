"""specd_kernels/attention/cpu.py (cpu.c) against the torch reference, and the property it exists for: a
row's bits depend only on the keys it sees."""
from __future__ import annotations

import shutil

import pytest
import torch

from specd_kernels import attention, backend, cbuild
from specd_kernels.attention import cpu, ref
from tests.kernels.paged import make_batch, random_hidden_keys, without_hidden_keys

pytestmark = pytest.mark.skipif(shutil.which(cbuild.compiler()) is None, reason="no C compiler")

SHAPES = [(1, 1, 64), (3, 3, 64), (2, 4, 128), (1, 3, 16)]  # (num_kv_heads, group, head_dim)
CASES = {  # q_lens, kv_lens, requests with a tree, leading prompt rows per request (None: none)
    "decode_boundaries": ([1, 1, 1, 1, 1], [15, 16, 17, 32, 33], (), None),
    "verify_chains_and_trees": ([9, 1, 16, 4], [30, 2, 70, 4], (0, 3), None),
    "mixed_with_prefill": ([0, 1, 5, 40, 1, 17, 3], [10, 15, 16, 40, 33, 49, 3], (2, 3), None),
    "long_prefill_chunk": ([70, 1], [130, 300], (), None),
    # prompt rows (their own arithmetic where cpu.c has it): a tree's are ignored, a recomputed
    # request's prompt rows come before its output rows
    "prompt_rows_mixed": ([0, 1, 5, 40, 1, 17, 3], [10, 15, 16, 40, 33, 49, 3], (2, 3), [0, 0, 0, 40, 1, 10, 3]),
    "prompt_chunks": ([200, 33, 1], [460, 33, 90], (), [200, 33, 1]),
}


@pytest.fixture(autouse=True)
def auto_backend():
    previous = backend.get_backend()
    backend.set_backend("auto")
    assert cpu.load() is not None, "a C compiler is here, so the C attention must build"
    yield
    backend.set_backend(previous)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"kv{s[0]}-g{s[1]}-d{s[2]}")
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, shape):
    q_lens, kv_lens, tree_ids, prompt_rows = CASES[case]
    b = make_batch(q_lens, kv_lens, shape[0], shape[1], shape[2], tree_ids=tree_ids, seed=len(case))
    plan = attention.plan_attention(b.cu_seqlens_q, b.kv_lens, b.block_tables, b.k_cache.shape[1], shape[1],
                                    b.tree_mask, b.cu_tree_mask, row_exact=True, prompt_rows=prompt_rows)
    assert isinstance(plan, cpu.CpuPlan)
    out = torch.full_like(b.q, float("nan"))
    attention.paged_attention(*b.args(), out=out, plan=plan)
    torch.testing.assert_close(out, ref.paged_attention(*b.args()), atol=2e-5, rtol=1e-4)


def test_only_row_exact_plans_use_c_and_forcing_the_reference_wins():
    b = make_batch([1, 3], [9, 12], 1, 3, 16)
    assert isinstance(attention.plan_attention(b.cu_seqlens_q, b.kv_lens, b.block_tables, 16, 3), ref.AttentionPlan)
    backend.set_backend("ref")
    plan = attention.plan_attention(b.cu_seqlens_q, b.kv_lens, b.block_tables, 16, 3, row_exact=True)
    assert isinstance(plan, ref.AttentionPlan)


@pytest.mark.parametrize("q_len", [6, 37])  # a verified chain; a prompt chunk (more than one row block)
def test_a_row_has_the_bits_of_the_same_token_decoded(q_len):
    """Row j of a q_len-row step sees the same keys as that token decoded alone with j fewer new keys:
    same bits, alone and next to other requests."""
    kv_len = 45
    b = make_batch([2, q_len, 3], [20, kv_len, 7], 3, 3, 64, seed=11)
    verify = cpu.paged_attention(*b.args())
    start = int(b.cu_seqlens_q[1])
    for j in range(q_len):
        q = b.q[start + j : start + j + 1]
        for neighbours in (False, True):
            if neighbours:  # the same decode row between two other requests' rows
                qs = torch.cat([b.q[:2], q, b.q[start + q_len :]])
                cu = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
                lens = torch.tensor([20, kv_len - q_len + j + 1, 7], dtype=torch.int32)
                row = 2
            else:
                qs, cu, lens, row = q, torch.tensor([0, 1], dtype=torch.int32), torch.tensor(
                    [kv_len - q_len + j + 1], dtype=torch.int32), 0
            tables = b.block_tables if neighbours else b.block_tables[1:2].contiguous()
            decode = cpu.paged_attention(qs, b.k_cache, b.v_cache, cu, lens, tables, b.scale)
            assert torch.equal(decode[row], verify[start + j]), f"row {j} (neighbours: {neighbours})"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_prompt_row_has_its_bits_in_any_chunk_and_batch(head_dim):
    """Prompt rows (their own arithmetic where cpu.c has AVX-512) depend only on their query and the
    keys they see: a 150-token prompt in one chunk or in chunks of 1, 7, 32, 33 and 77 rows, alone
    or between other requests' decode and prompt rows, gives every row the same bits."""
    n = 150
    b = make_batch([n], [n], 3, 3, head_dim, seed=13)
    table = b.block_tables[0:1]
    whole = cpu.paged_attention(*b.args(), plan=cpu.plan_attention(b.cu_seqlens_q, b.kv_lens, table, 16, 3,
                                                                    prompt_rows=[n]))
    other = make_batch([1, 40], [60, 40], 3, 3, head_dim, seed=14)
    for chunk in (1, 7, 32, 33, 77):
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            q, cu = b.q[start:stop], torch.tensor([0, stop - start], dtype=torch.int32)
            lens, tables, prompts, rows = torch.tensor([stop], dtype=torch.int32), table, [stop - start], slice(None)
            if chunk == 33:  # between a decode row and another prompt's chunk, in one cache
                k_cache, v_cache = torch.cat([b.k_cache, other.k_cache]), torch.cat([b.v_cache, other.v_cache])
                other_tables = torch.where(other.block_tables >= 0, other.block_tables + b.k_cache.shape[0], -1)
                width = max(table.shape[1], other_tables.shape[1])
                pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)  # noqa: E731
                tables = torch.cat([pad(other_tables[:1]), pad(table), pad(other_tables[1:])]).contiguous()
                q = torch.cat([other.q[:1], q, other.q[1:]])
                cu = torch.tensor([0, 1, 1 + stop - start, 41 + stop - start], dtype=torch.int32)
                lens = torch.tensor([60, stop, 40], dtype=torch.int32)
                prompts, rows = [0, stop - start, 40], slice(1, 1 + stop - start)
            else:
                k_cache, v_cache = b.k_cache, b.v_cache
            plan = cpu.plan_attention(cu, lens, tables, 16, 3, prompt_rows=prompts)
            got = cpu.paged_attention(q, k_cache, v_cache, cu, lens, tables, b.scale, plan=plan)
            assert torch.equal(got[rows], whole[start:stop]), f"chunk {chunk}, rows {start}-{stop}"


@pytest.mark.skipif(not cpu.kv_half_supported(), reason="no F16C: fp16 caches take the reference")
@pytest.mark.parametrize("case", sorted(CASES))
def test_fp16_caches_give_the_bits_of_their_fp32_values(case):
    """An fp16 K/V cache is read as its exact fp32 values: the same bits as the fp32 kernel on
    cache.float(), and the reference (which converts too) agrees."""
    q_lens, kv_lens, tree_ids, prompt_rows = CASES[case]
    b = make_batch(q_lens, kv_lens, 3, 3, 64, tree_ids=tree_ids, seed=21)
    plan = cpu.plan_attention(b.cu_seqlens_q, b.kv_lens, b.block_tables, 16, 3, b.tree_mask, b.cu_tree_mask,
                              prompt_rows)
    half = [c.to(torch.float16) for c in (b.k_cache, b.v_cache)]
    args = list(b.args())
    args[1], args[2] = half
    got = cpu.paged_attention(*args, plan=plan)
    args[1], args[2] = (c.float() for c in half)
    assert torch.equal(got, cpu.paged_attention(*args, plan=plan))
    args[1], args[2] = half
    torch.testing.assert_close(got, ref.paged_attention(*args), atol=2e-5, rtol=1e-4)


def test_queries_may_be_a_view_of_the_fused_projection():
    """The model passes q as a slice of its qkv output: rows strided, heads packed."""
    b = make_batch([3, 1, 20], [10, 5, 30], 3, 3, 64, seed=12)
    wide = torch.cat([b.q, torch.randn(b.q.shape[0], 6, 64)], dim=1)  # [rows, 9 + 6, 64]
    view = wide[:, :9]
    assert not view.is_contiguous()
    got = cpu.paged_attention(view, *b.args()[1:])
    assert torch.equal(got, cpu.paged_attention(*b.args()))


@pytest.mark.parametrize("case", ["decode_boundaries", "verify_chains_and_trees", "long_prefill_chunk"])
def test_hidden_keys_are_as_if_absent(case):
    """--spec-layout padded-kv's padding: hidden context keys are read but weigh nothing, in cpu.c and
    in the reference alike (a prefill chunk over hidden keys is the reference's single-request path)."""
    q_lens, kv_lens, tree_ids, _ = CASES[case]
    b = make_batch(q_lens, kv_lens, 3, 3, 64, tree_ids=tree_ids, seed=5)
    hidden = random_hidden_keys(b, 0.4, seed=len(case))
    assert hidden.any()
    expected = ref.paged_attention(*without_hidden_keys(b, hidden).args())
    plan = cpu.plan_attention(b.cu_seqlens_q, b.kv_lens, b.block_tables, 16, 3, b.tree_mask, b.cu_tree_mask,
                              hidden_keys=hidden)
    torch.testing.assert_close(cpu.paged_attention(*b.args(), plan=plan), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ref.paged_attention(*b.args(), hidden_keys=hidden), expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(cpu.paged_attention(*b.args()), expected, atol=1e-3)  # hiding changed something


def test_hidden_keys_are_checked():
    b = make_batch([1, 3], [9, 12], 1, 3, 16)
    with pytest.raises(ValueError, match="hidden_keys must be"):
        cpu.plan_attention(b.cu_seqlens_q, b.kv_lens, b.block_tables, 16, 3, hidden_keys=torch.zeros(2, 5))
    hidden = torch.zeros(2, 12, dtype=torch.bool)
    hidden[1, 2] = True
    with pytest.raises(ValueError, match="prompt rows"):
        cpu.plan_attention(b.cu_seqlens_q, b.kv_lens, b.block_tables, 16, 3, prompt_rows=[0, 3], hidden_keys=hidden)
