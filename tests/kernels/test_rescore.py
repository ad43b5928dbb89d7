"""specd_kernels/rescore: the C kernel against the torch reference, and a row's result alone vs in a batch."""
from __future__ import annotations

import shutil

import pytest
import torch

from specd_kernels import backend, cbuild, rescore
from specd_kernels.rescore import cpu, ref

needs_cc = pytest.mark.skipif(shutil.which(cbuild.compiler()) is None, reason="no C compiler")
VOCAB, WIDTH = 1000, 96


def _inputs(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, WIDTH, generator=gen)
    hidden = torch.randn(rows, WIDTH, generator=gen)
    # int8-like logits: the exact ones plus an error, so the leading candidates are near the true top
    logits = hidden @ weight.T + 0.3 * torch.randn(rows, VOCAB, generator=gen)
    return logits, hidden, weight


def _run(fn, logits, hidden, weight, k):
    out = logits.clone()
    fn(out, hidden, weight, k)
    return out


def test_reference_replaces_exactly_the_k_largest():
    logits, hidden, weight = _inputs(3, 0)
    out = _run(ref.rescore_top_k, logits, hidden, weight, 5)
    top = logits.topk(5, dim=-1).indices
    changed = out != logits
    assert changed.sum(-1).tolist() == [5, 5, 5]
    assert torch.equal(changed.nonzero()[:, 1].view(3, 5).sort(-1).values, top.sort(-1).values)
    exact = (hidden.double() @ weight.double().T).float()
    assert torch.equal(out.gather(1, top), exact.gather(1, top))


@needs_cc
@pytest.mark.parametrize("rows,k", [(1, 1), (4, 10), (33, 64)])
def test_c_matches_reference(rows, k):
    assert cpu.load() is not None, "a C compiler is here, so the C kernel must build"
    logits, hidden, weight = _inputs(rows, rows + k)
    want = _run(ref.rescore_top_k, logits, hidden, weight, k)
    got = _run(rescore.rescore_top_k, logits, hidden, weight, k)
    # same candidates; values equal up to the float64 sum's order, rounded once to fp32
    assert torch.equal(got != logits, want != logits)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_cc
@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_c_matches_reference_when_every_block_or_none_holds_a_candidate(order):
    """The C pass skips 32-logit blocks with nothing above the k-th held value: sorted logits make
    every block (ascending) or no block (descending) hold a new candidate."""
    logits, hidden, weight = _inputs(3, 11)
    logits = logits.sort(dim=-1, descending=order == "descending").values
    logits[:, 64] = logits.max() + 1  # the first logit of block 2, right after skipped block 1
    want = _run(ref.rescore_top_k, logits, hidden, weight, 7)
    got = _run(rescore.rescore_top_k, logits, hidden, weight, 7)
    assert torch.equal(got != logits, want != logits)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_cc
def test_a_row_is_the_same_alone_and_in_a_batch_with_strided_inputs():
    logits, hidden, weight = _inputs(9, 7)
    wide = torch.randn(9, VOCAB + 5)
    wide[:, :VOCAB] = logits
    batched = wide[:, :VOCAB]  # strided rows
    rescore.rescore_top_k(batched, hidden, weight, 10)
    for r in range(9):
        alone = logits[r : r + 1].clone()
        rescore.rescore_top_k(alone, hidden[r : r + 1], weight, 10)
        assert torch.equal(alone[0], batched[r])


@needs_cc
def test_ties_keep_the_lower_token_id_and_k_is_checked():
    weight = torch.eye(4, WIDTH)
    hidden = torch.zeros(1, WIDTH)
    hidden[0, :4] = torch.tensor([5.0, 6.0, 7.0, 8.0])
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0]])
    rescore.rescore_top_k(logits, hidden, weight, 2)
    assert logits.tolist() == [[1.0, 6.0, 7.0, 2.0]]
    with pytest.raises(ValueError, match="k must be"):
        rescore.rescore_top_k(logits, hidden, weight, 65)


def test_forced_reference_backend_runs_the_reference(monkeypatch):
    monkeypatch.setattr(backend, "_backend", "ref")
    called = []
    monkeypatch.setattr(ref, "rescore_top_k", lambda *a: called.append(a))
    logits, hidden, weight = _inputs(2, 3)
    rescore.rescore_top_k(logits, hidden, weight, 3)
    assert called
