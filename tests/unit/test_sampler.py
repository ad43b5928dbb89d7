"""Sampler: greedy, distributions, truncation, penalties, bias, seeds and logprobs (small vocabularies)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from engine.sampler import (
    apply_logit_processors,
    get_generator,
    probs_from_logits,
    sample_from_probs,
)
from engine.verify_step import verify_step
from engine.types import Request, SamplingParams, ScheduledRequest


class Sampler:
    """The engine's plain sampling path: verification of requests that carry no drafts."""

    def sample(self, logits, requests):
        verified = verify_step(logits, [ScheduledRequest(r, 1) for r in requests], {})
        return SimpleNamespace(token_ids=[v.result.token_ids[0] for v in verified],
                               logprobs=[v.logprobs[0] for v in verified])


def make_request(rid="r", output=(), prompt=(1, 2, 3), **sampling) -> Request:
    return Request(
        request_id=rid,
        token_ids=list(prompt) + list(output),
        num_prompt_tokens=len(prompt),
        sampling=SamplingParams(**sampling),
    )


def sample_many(logits_row, num, **sampling) -> torch.Tensor:
    """Frequencies of `num` draws from one request (one row at a time, its generator advancing)."""
    req = make_request(seed=1234, **sampling)
    sampler = Sampler()
    # Many rows of the same request in one call: each row draws from the shared generator in turn.
    logits = logits_row.repeat(num, 1)
    tokens = sampler.sample(logits, [req] * num).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.numel()).double() / num


def total_variation(p, q) -> float:
    return 0.5 * (p.double() - q.double()).abs().sum().item()


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(16, 1000)
    reqs = [make_request(str(i), temperature=0.0) for i in range(16)]
    out = Sampler().sample(logits, reqs)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 16


def test_greedy_ignores_top_k_top_p_and_is_deterministic():
    logits = torch.randn(4, 50)
    reqs = [make_request(str(i), temperature=0.0, top_k=3, top_p=0.5) for i in range(4)]
    assert Sampler().sample(logits, reqs).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    freq = sample_many(LOGITS, 40000, temperature=temperature)
    target = torch.softmax(LOGITS / temperature, -1)
    assert total_variation(freq, target) < 0.015


def test_chi_square_goodness_of_fit():
    num = 20000
    freq = sample_many(LOGITS, num, temperature=1.0)
    expected = torch.softmax(LOGITS.double(), -1) * num
    chi2 = (((freq * num) - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.3  # 99.9th percentile of chi-square with 7 degrees of freedom


def test_top_k_restricts_support_exactly():
    freq = sample_many(LOGITS, 20000, temperature=1.0, top_k=3)
    top3 = {0, 6, 1}
    assert {i for i in range(8) if freq[i] > 0} == top3
    target = torch.zeros(8)
    target[list(top3)] = torch.softmax(LOGITS[list(top3)], -1)
    assert total_variation(freq, target) < 0.02


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    # 0.5 < 0.7 so the second token is needed; 0.8 >= 0.7 so the third is not.
    freq = sample_many(logits, 20000, top_p=0.7)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - 0.625) < 0.02
    # top_p below the top token's probability still keeps the top token.
    assert (sample_many(logits, 200, top_p=0.1) == torch.tensor([1.0, 0, 0, 0])).all()


def test_top_k_and_top_p_together():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    p = probs_from_logits(probs.log()[None], [SamplingParams(top_k=3, top_p=0.75)])[0]
    # top-3 renormalized: .444,.333,.222; mass before third = .777 >= .75 -> drop it.
    assert torch.allclose(p, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]), atol=1e-6)


def test_probs_rows_have_their_own_params():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4)
    params = [SamplingParams(), SamplingParams(top_k=1), SamplingParams(temperature=0.0), SamplingParams(top_k=2)]
    p = probs_from_logits(logits, params)
    assert torch.allclose(p[0], torch.softmax(logits[0], -1))
    assert p[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert p[2].tolist() == [1.0, 0.0, 0.0, 0.0]  # greedy rows: one-hot of the argmax
    assert (p[3][2:] == 0).all() and torch.allclose(p[3][:2], torch.softmax(logits[0, :2], -1))


def test_presence_and_frequency_penalties():
    logits = torch.zeros(2, 6)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), SamplingParams()]
    out = apply_logit_processors(logits, params, [[1, 1, 1, 4], [1, 1]])
    assert out[0].tolist() == [0.0, -(0.5 + 0.75), 0.0, 0.0, -(0.5 + 0.25), 0.0]
    assert out[1].tolist() == [0.0] * 6  # no penalty configured
    assert logits.abs().sum() == 0  # the input is left untouched (raw logits feed logprobs)


def test_penalties_count_output_not_prompt():
    req = make_request(prompt=(3, 3, 3), output=(5,), temperature=0.0, presence_penalty=2.0)
    logits = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 1.5]])
    assert Sampler().sample(logits, [req]).token_ids == [3]  # 5 penalized to -0.5; 3 (prompt only) untouched


def test_logit_bias_shifts_and_forces():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(logit_bias={2: 10.0, 0: -1.0, 99: 5.0})]  # 99 is out of range: ignored
    out = apply_logit_processors(logits, params, [[]])
    assert out.tolist() == [[4.0, 0.0, 10.0, 0.0]]
    req = make_request(temperature=0.0, logit_bias={3: 100.0})
    assert Sampler().sample(logits, [req]).token_ids == [3]
    req = make_request(temperature=1.0, logit_bias={0: -100.0, 1: -100.0, 2: -100.0})
    assert set(Sampler().sample(logits.repeat(50, 1), [req] * 50).token_ids) == {3}


def _seeded_run(seed, row, batch, steps=20, vocab=64):
    """Tokens of request 'me' when it sits on `row` among `batch` rows of other requests."""
    torch.manual_seed(99)
    logits_seq = [torch.randn(vocab) for _ in range(steps)]
    me = make_request("me", temperature=0.9, top_p=0.95, seed=seed)
    others = [make_request(f"o{i}", temperature=1.0) for i in range(batch - 1)]
    tokens = []
    for step in range(steps):
        reqs = others[:row] + [me] + others[row:]
        logits = torch.randn(batch, vocab)
        logits[row] = logits_seq[step]
        tok = Sampler().sample(logits, reqs).token_ids[row]
        me.token_ids.append(tok)
        tokens.append(tok)
    return tokens


def test_same_seed_same_tokens_regardless_of_batch():
    alone = _seeded_run(7, row=0, batch=1)
    assert _seeded_run(7, row=3, batch=8) == alone
    assert _seeded_run(7, row=0, batch=5) == alone
    assert _seeded_run(8, row=0, batch=1) != alone


def test_unseeded_requests_differ():
    logits = torch.zeros(1, 1000)
    runs = {tuple(Sampler().sample(logits.repeat(5, 1), [make_request(str(i))] * 5).token_ids) for i in range(5)}
    assert len(runs) == 5


def test_generator_is_stored_on_request():
    req = make_request(seed=3)
    gen = get_generator(req)
    assert req.state["generator"] is gen and get_generator(req) is gen


def test_sample_from_probs_never_picks_zero_probability():
    probs = torch.zeros(64, 10)
    probs[:, 4] = 0.5
    probs[:, 7] = 0.5
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    assert set(sample_from_probs(probs, gens).tolist()) <= {4, 7}


def test_logprobs_are_raw_log_softmax_sorted():
    torch.manual_seed(1)
    logits = torch.randn(3, 100)
    reqs = [
        make_request("a", temperature=0.0, logprobs=5),
        make_request("b", temperature=0.7, logprobs=0, logit_bias={0: 50.0}),
        make_request("c", temperature=0.0),
    ]
    out = Sampler().sample(logits, reqs)
    raw = torch.log_softmax(logits, -1)
    a, b, c = out.logprobs
    assert c is None
    assert a.token_id == out.token_ids[0] and math.isclose(a.logprob, raw[0, a.token_id].item(), rel_tol=1e-5)
    values, ids = raw[0].topk(5)
    assert [t for t, _ in a.top] == ids.tolist()
    assert [lp for _, lp in a.top] == pytest.approx(values.tolist())
    assert all(x[1] >= y[1] for x, y in zip(a.top, a.top[1:]))
    # b was forced to token 0 by its bias, but its logprob is the unbiased model's.
    assert b.token_id == out.token_ids[1] == 0 and b.top == []
    assert math.isclose(b.logprob, raw[1, 0].item(), rel_tol=1e-5)


def test_logprobs_capped_at_20():
    out = Sampler().sample(torch.randn(1, 100), [make_request(temperature=0.0, logprobs=50)])
    assert len(out.logprobs[0].top) == 20


def test_mixed_batch():
    torch.manual_seed(2)
    logits = torch.randn(6, 300)
    reqs = [make_request(str(i), temperature=0.0 if i % 2 else 1.0, seed=i) for i in range(6)]
    out = Sampler().sample(logits, reqs)
    for i in (1, 3, 5):
        assert out.token_ids[i] == logits[i].argmax().item()
    assert all(0 <= t < 300 for t in out.token_ids)


def _reference_probs(logits_row, temperature, top_k, top_p):
    """Plain per-row full sort: the definition _truncate's growing prefix must reproduce."""
    x = logits_row.double() / temperature
    order = x.argsort(descending=True)
    keep = torch.zeros_like(x, dtype=torch.bool)
    k = top_k if top_k > 0 else x.numel()
    kept = order[:k]
    p = torch.softmax(x[kept], -1)
    before = 0.0
    for j, tok in enumerate(kept.tolist()):
        if j > 0 and before >= top_p:
            break
        keep[tok] = True
        before += p[j].item()
    return torch.softmax(x.masked_fill(~keep, float("-inf")), -1)


def test_truncation_matches_full_sort_reference():
    torch.manual_seed(3)
    vocab = 5000
    # Flat rows need a prefix far past 256 to reach top_p: exercises the growing topk.
    logits = torch.cat([torch.randn(4, vocab) * 3, torch.randn(4, vocab) * 0.1])
    settings = [(1.0, 0, 0.9), (0.7, 40, 1.0), (1.3, 0, 1.0), (1.0, 300, 0.5),
                (1.0, 0, 0.95), (1.0, 1000, 0.99), (0.5, 0, 0.3), (1.0, 0, 1.0)]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in settings]
    probs = probs_from_logits(logits, params)
    for i, (t, k, p) in enumerate(settings):
        ref = _reference_probs(logits[i], t, k, p)
        assert torch.equal(probs[i] > 0, ref > 0), i
        assert torch.allclose(probs[i].double(), ref, atol=1e-6), i


def test_sample_from_probs_across_cdf_blocks():
    """A vocabulary spanning several CDF blocks (and a padded last block), with unnormalized probs."""
    torch.manual_seed(4)
    vocab = 700
    probs = torch.softmax(torch.randn(vocab) * 2, -1)
    probs[torch.rand(vocab) < 0.3] = 0.0  # zeros scattered over every block
    gen = torch.Generator().manual_seed(5)
    counts = torch.zeros(vocab, dtype=torch.float64)
    num = 0
    for _ in range(10):
        rows = (probs * 3.0).repeat(10000, 1)  # unnormalized on purpose
        tokens = sample_from_probs(rows, [gen] * 10000)
        counts += torch.bincount(tokens, minlength=vocab).double()
        num += 10000
    assert counts[probs == 0].sum() == 0
    assert total_variation(counts / num, probs / probs.sum()) < 0.03


def test_logit_bias_string_keys_and_junk():
    logits = torch.zeros(1, 4)
    out = apply_logit_processors(logits, [SamplingParams(logit_bias={"2": 1.5, "x": 3.0, -1: 2.0})], [[]])
    assert out.tolist() == [[0.0, 0.0, 1.5, 0.0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_seeded_requests():
    torch.manual_seed(6)
    logits = torch.randn(8, 2000)
    params = dict(temperature=0.8, top_p=0.9, top_k=100, presence_penalty=0.3, logprobs=3)
    cpu = Sampler().sample(logits, [make_request(str(i), seed=i, **params) for i in range(8)])
    gpu = Sampler().sample(logits.cuda(), [make_request(str(i), seed=i, **params) for i in range(8)])
    assert cpu.token_ids == gpu.token_ids
