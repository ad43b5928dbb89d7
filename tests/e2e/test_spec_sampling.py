"""Lossless speculative SAMPLING through the real engine (DESIGN.md, "Lossless"; issue 3, "Tests").

A tiny random Llama with a 4-token vocabulary makes the target distribution computable exactly:
the joint law of the first 3 generated tokens at temperature 1 is enumerated over all 4^3
continuations with HF transformers (fp32 forward, one softmax per step). Thousands of requests
then sample through `LLMEngine` with `--spec none`, `ngram`, `jacobi`, `pass`, `bpd` and `recycle` (64 per batch, so
verify steps are batched and ragged), and a chi-square goodness-of-fit test compares the empirical joint
with the exact one. Speculative runs use a long max_tokens (so the drafted chains/trees that decide
tokens 2 and 3 are several nodes deep, with sibling branches for Jacobi) and abort each request
once it has its 3 tokens. PaSS and BPD drafts are *sampled* from the distributions q of PaSS's
look-ahead rows and BPD's head rows (seeded random embeddings and heads here), and recycle drafts from
a seeded random module's q over a draft vocabulary that leaves out token 3, so they exercise the
verifier's non-one-hot q path end to end, with q = 0 where p > 0 too.

The same statistic must catch a wrong rule: recovered tokens drawn from p instead of
norm(max(p - q, 0)), and an acceptance test 10% too generous (min(1, 1.1 p / q)).

Every request carries its own seed, so the test is deterministic on a given machine.
`spec_adaptive=False`: every proposed draft is verified (the cost controller could choose none).
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from engine import verifier
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.types import EngineRequest, SamplingParams, SpecParams
from tests.conftest import make_tiny_model

VOCAB = 4
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]  # repetitive, so the n-gram drafter always finds a match
NUM_TOKENS = 3  # the joint law of the first NUM_TOKENS generated tokens is tested
SPEC_MAX_TOKENS = 8  # speculative runs draft up to 6 nodes at the first decode step
NUM_DRAFT_TOKENS = 8
BATCH = 64
NUM_SAMPLES = 4096
ALPHA = 1e-4
MIN_EXPECTED = 5.0


# ---------------------------------------------------------------- statistics (scipy is optional)


def _gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) (series / Lentz continued fraction)."""
    if x <= 0.0:
        return 1.0
    log_prefactor = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(100_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefactor))
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 100_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return math.exp(log_prefactor) * h


def chi2_sf(x: float, df: int) -> float:
    try:
        from scipy.stats import chi2
        return float(chi2.sf(x, df))
    except ImportError:
        return _gamma_q(df / 2.0, x / 2.0)


def chi2_critical(df: int, alpha: float = ALPHA) -> float:
    """x with P(chi2_df > x) = alpha."""
    try:
        from scipy.stats import chi2
        return float(chi2.isf(alpha, df))
    except ImportError:
        lo, hi = 0.0, df + 100.0 * math.sqrt(df) + 100.0
        for _ in range(200):
            mid = (lo + hi) / 2.0
            lo, hi = (mid, hi) if _gamma_q(df / 2.0, mid / 2.0) > alpha else (lo, mid)
        return (lo + hi) / 2.0


def chi_square(counts: Counter, expected_probs: dict[tuple, float]) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom, cells pooled (rarest first) until each
    pooled cell expects >= MIN_EXPECTED. An observed outcome of probability 0 gives inf."""
    n = sum(counts.values())
    if any(expected_probs.get(k, 0.0) <= 0.0 for k in counts):
        return math.inf, 1
    bins, exp_acc, obs_acc = [], 0.0, 0
    for cell in sorted(expected_probs, key=expected_probs.get):
        exp_acc += n * expected_probs[cell]
        obs_acc += counts.get(cell, 0)
        if exp_acc >= MIN_EXPECTED:
            bins.append([exp_acc, obs_acc])
            exp_acc, obs_acc = 0.0, 0
    if exp_acc > 0.0 or obs_acc:  # the remainder joins the last pooled cell
        bins[-1][0] += exp_acc
        bins[-1][1] += obs_acc
    stat = sum((o - e) ** 2 / e for e, o in bins)
    return stat, len(bins) - 1


def test_chi2_critical_values():
    assert chi2_critical(1, 0.05) == pytest.approx(3.841459, rel=1e-5)
    assert chi2_critical(10, 1e-4) == pytest.approx(35.56401, rel=1e-5)
    assert chi2_sf(35.56401, 10) == pytest.approx(1e-4, rel=1e-4)
    for x in (0.5, 2.0, 7.0):  # Q(1, x) = exp(-x), on both sides of the series / fraction switch
        assert _gamma_q(1.0, x) == pytest.approx(math.exp(-x), rel=1e-12)
    assert _gamma_q(20.0, 20.999999) == pytest.approx(_gamma_q(20.0, 21.000001), rel=1e-5)


# ---------------------------------------------------------------- the exact target distribution


@dataclass
class ExactLaw:
    """Conditional next-token probabilities (float64) after the prompt and every 1-2 token prefix."""

    first: torch.Tensor  # [V]            p(t1)
    second: torch.Tensor  # [V, V]        p(t2 | t1)
    third: torch.Tensor  # [V, V, V]      p(t3 | t1, t2)

    def conditionals(self, top_k: int = 0):
        if top_k <= 0:
            return self.first, self.second, self.third
        return tuple(_keep_top_k(p, top_k) for p in (self.first, self.second, self.third))

    def joint(self, top_k: int = 0) -> dict[tuple[int, int, int], float]:
        p1, p2, p3 = self.conditionals(top_k)
        return {(a, b, c): float(p1[a] * p2[a, b] * p3[a, b, c])
                for a, b, c in itertools.product(range(VOCAB), repeat=3)}


def _keep_top_k(p: torch.Tensor, k: int) -> torch.Tensor:
    kth = p.topk(k, dim=-1).values[..., -1:]
    kept = torch.where(p >= kth, p, torch.zeros_like(p))
    return kept / kept.sum(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, default_model_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-vocab4"), default_model_dir, seed=0, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def exact(small_vocab_model) -> ExactLaw:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(small_vocab_model), dtype=torch.float32).eval()
    prefixes = list(itertools.product(range(VOCAB), repeat=2))
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + list(pre) for pre in prefixes])).logits.double()
    probs = torch.softmax(logits, dim=-1)  # row j: next-token law after PROMPT + prefix[:j - len(PROMPT) + 1]
    n = len(PROMPT)
    first = probs[0, n - 1]
    second = torch.stack([probs[a * VOCAB, n] for a in range(VOCAB)])
    third = torch.stack([torch.stack([probs[a * VOCAB + b, n + 1] for b in range(VOCAB)]) for a in range(VOCAB)])
    law = ExactLaw(first, second, third)
    assert sum(law.joint().values()) == pytest.approx(1.0, abs=1e-9)
    return law


@pytest.fixture(scope="module")
def pass_artifact(small_vocab_model, tmp_path_factory):
    from engine.train.artifact import save_artifact, weight_fingerprint

    embeds = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    return save_artifact(tmp_path_factory.mktemp("pass") / "vocab4.safetensors", {"lookahead": embeds},
                         method="pass", base_model="vocab4", base_model_hash=weight_fingerprint(small_vocab_model))


@pytest.fixture(scope="module")
def bpd_artifact(small_vocab_model, tmp_path_factory):
    from tests.e2e.conftest import random_heads_artifact

    return random_heads_artifact(small_vocab_model, tmp_path_factory.mktemp("bpd") / "vocab4.safetensors")


@pytest.fixture(scope="module")
def recycle_artifact(small_vocab_model, tmp_path_factory):
    from tests.e2e.conftest import random_recycle_artifact

    return random_recycle_artifact(small_vocab_model, tmp_path_factory.mktemp("recycle") / "vocab4.safetensors",
                                   vocab=[0, 1, 2])


@pytest.fixture(scope="module")
def engine(small_vocab_model, pass_artifact, bpd_artifact, recycle_artifact):
    threads = torch.get_num_threads()
    # One thread: a 64-request step of this model is overhead-bound, and the CPU is shared.
    eng = LLMEngine(EngineConfig(model=str(small_vocab_model), spec="none", spec_adaptive=False,
                                 num_draft_tokens=NUM_DRAFT_TOKENS, num_threads=1, pass_artifact=str(pass_artifact),
                                 pass_lookahead=4,  # chains of 4 sampled drafts, not the default 1
                                 # Full prompt-lookup copies: this model's random text proves them wrong, and
                                 # the cutoff would then draft too few to test the rejection rule with.
                                 ngram_cutoff=0.0,
                                 bpd_artifact=str(bpd_artifact), recycle_artifact=str(recycle_artifact)))
    assert eng.model_config.vocab_size == VOCAB
    yield eng
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- sampling through the engine


@dataclass
class Samples:
    counts: Counter
    draft_tokens: int = 0
    accepted_tokens: int = 0


_ids = itertools.count()


def sample_first_tokens(engine: LLMEngine, method: str, num_samples: int, seed_base: int,
                        top_k: int = 0) -> Samples:
    """The first NUM_TOKENS tokens of num_samples seeded requests (seeds seed_base + i), submitted
    BATCH at a time; a request is aborted as soon as it has them."""
    max_tokens = NUM_TOKENS if method == "none" else SPEC_MAX_TOKENS
    out = Samples(Counter())
    for start in range(0, num_samples, BATCH):
        tokens: dict[str, list[int]] = {}
        for i in range(start, min(start + BATCH, num_samples)):
            rid = f"{method}-{next(_ids)}"
            tokens[rid] = []
            engine.add_request(EngineRequest(
                rid, list(PROMPT),
                SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=top_k, ignore_eos=True,
                               seed=seed_base + i),
                SpecParams(method=method)))
        while engine.has_unfinished_requests():
            for o in engine.step():
                got = tokens[o.request_id]
                got.extend(o.new_token_ids)
                if o.finished:
                    assert o.error is None, o.error
                    out.draft_tokens += o.spec.draft_tokens
                    out.accepted_tokens += o.spec.accepted_tokens
                elif len(got) >= NUM_TOKENS:
                    engine.abort_request(o.request_id)
        for rid, got in tokens.items():
            assert len(got) >= NUM_TOKENS, (rid, got)
            out.counts[tuple(got[:NUM_TOKENS])] += 1
    assert engine.kv.usage == 0
    return out


@pytest.mark.parametrize("method", ["none", "ngram", "jacobi", "pass", "bpd", "recycle"])
def test_first_three_tokens_follow_the_exact_distribution(engine, exact, method):
    samples = sample_first_tokens(engine, method, NUM_SAMPLES, seed_base=1_000_000)
    stat, df = chi_square(samples.counts, exact.joint())
    critical = chi2_critical(df)
    print(f"{method}: chi2 {stat:.1f} df {df} critical {critical:.1f} drafts {samples.draft_tokens} "
          f"accepted {samples.accepted_tokens}")
    assert stat < critical, (f"{method}: chi2 {stat:.1f} >= {critical:.1f} (df {df}, p {chi2_sf(stat, df):.2e}); "
                             f"the sampled distribution is not the target's")
    if method != "none":
        # Drafts were really verified, some accepted, some rejected (the residual path ran).
        assert samples.draft_tokens > NUM_SAMPLES, samples
        assert 0 < samples.accepted_tokens < samples.draft_tokens, samples


def _residual_from_p(p, q, token):
    return p  # WRONG: the recovered token is drawn from p, not norm(max(p - q, 0))


def _accept_10pct_more(u, p_x, q_x):
    return u * q_x < 1.1 * p_x  # WRONG: accepts with min(1, 1.1 p / q)


@pytest.mark.parametrize("method,wrong_rule,num_samples", [
    ("ngram", "residual_from_p", 2048),
    ("jacobi", "residual_from_p", 2048),
    ("pass", "residual_from_p", 2048),
    ("bpd", "residual_from_p", 2048),
    ("recycle", "residual_from_p", 2048),
    ("jacobi", "accept_10pct_more", NUM_SAMPLES),
])
def test_a_wrong_rejection_rule_is_caught(engine, exact, monkeypatch, method, wrong_rule, num_samples):
    if wrong_rule == "residual_from_p":
        monkeypatch.setattr(verifier, "residual", _residual_from_p)
    else:
        monkeypatch.setattr(verifier, "accepts", _accept_10pct_more)
    samples = sample_first_tokens(engine, method, num_samples, seed_base=2_000_000)
    stat, df = chi_square(samples.counts, exact.joint())
    critical = chi2_critical(df)
    print(f"{method} with {wrong_rule}: chi2 {stat:.1f} df {df} critical {critical:.1f}")
    assert stat > critical, (f"{method} with {wrong_rule}: chi2 {stat:.1f} <= {critical:.1f} (df {df}); "
                             f"the test cannot tell a wrong rule from the right one")


def test_top_k_2_with_ngram_stays_in_the_top_2_and_follows_the_truncated_law(engine, exact):
    p1, p2, p3 = exact.conditionals()
    for p in (p1, p2, p3):  # an fp32 near-tie between 2nd and 3rd would make "top-2" ambiguous
        top3 = p.topk(3, dim=-1).values
        assert float((top3[..., 1] - top3[..., 2]).min()) > 1e-4
    samples = sample_first_tokens(engine, "ngram", 2048, seed_base=3_000_000, top_k=2)
    top2 = [set(p1.topk(2).indices.tolist()), p2.topk(2, dim=-1).indices.tolist(),
            p3.topk(2, dim=-1).indices.tolist()]
    for a, b, c in samples.counts:
        assert a in top2[0] and b in top2[1][a] and c in top2[2][a][b], (a, b, c)
    assert samples.draft_tokens > 0 and samples.accepted_tokens > 0, samples
    stat, df = chi_square(samples.counts, exact.joint(top_k=2))
    print(f"top_k=2 ngram: chi2 {stat:.1f} df {df} critical {chi2_critical(df):.1f} drafts {samples.draft_tokens} "
          f"accepted {samples.accepted_tokens}")
    assert stat < chi2_critical(df), (stat, df)
