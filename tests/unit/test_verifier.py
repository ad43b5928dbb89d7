"""Verifier (engine/verifier.py): greedy paths over chains and trees, ragged batches, and the
lossless-sampling test: the joint distribution of the first 3 generated tokens under speculation
equals the target's, and deliberately wrong rejection rules are caught by the same statistic."""
from __future__ import annotations

import random

import pytest
import torch

from engine import verifier
from engine.spec.base import chain, empty_tree
from engine.types import DraftTree
from engine.verifier import emitted_rows, verify, verify_greedy, verify_stochastic

# ---------------------------------------------------------------- greedy


def greedy(tree, target_tokens):
    r = verify_greedy(tree, target_tokens)
    assert r.num_draft == len(tree) and r.num_accepted == len(r.accepted_nodes) == len(r.token_ids) - 1
    return r.token_ids, r.accepted_nodes


def test_greedy_chain():
    tree = chain([5, 6, 7])
    # target_tokens[r] = the target's argmax after row r (root, then each node).
    assert greedy(tree, [5, 6, 7, 8]) == ([5, 6, 7, 8], [0, 1, 2])  # all accepted + bonus
    assert greedy(tree, [1, 6, 7, 8]) == ([1], [])  # first draft rejected: recovered token
    assert greedy(tree, [5, 2, 7, 8]) == ([5, 2], [0])  # middle
    assert greedy(tree, [5, 6, 3, 8]) == ([5, 6, 3], [0, 1])  # last


def test_greedy_zero_drafts():
    assert greedy(empty_tree(), [9]) == ([9], [])


def test_greedy_tree_longest_path_wins():
    #        root
    #       /    \
    #      0(5)   1(5)      <- duplicate sibling tokens: both match
    #      |      |
    #      2(6)   3(6)
    #             |
    #             4(7)
    tree = DraftTree([5, 5, 6, 6, 7], [-1, -1, 0, 1, 3])
    rows = [5, 6, 6, 0, 7, 9]  # row r = target token after (root, node 0, ..., node 4)
    assert greedy(tree, rows) == ([5, 6, 7, 9], [1, 3, 4])
    # The deeper branch's leaf rejected -> a tie in length; the first-listed child wins.
    assert greedy(tree, [5, 6, 6, 0, 1, 9]) == ([5, 6, 0], [0, 2])


def test_greedy_tie_prefers_first_listed_branch_not_lowest_index():
    # Branch A (node 0) lists its child last in index order; both paths have length 2.
    tree = DraftTree([5, 6, 7, 8], [-1, -1, 1, 0])
    assert greedy(tree, [5, 8, 7, 1, 2]) == ([5, 8, 2], [0, 3])
    assert greedy(tree, [6, 8, 7, 1, 2]) == ([6, 7, 1], [1, 2])


def test_greedy_no_sibling_matches():
    tree = DraftTree([1, 2, 3], [-1, -1, -1])
    assert greedy(tree, [4, 0, 0, 0]) == ([4], [])


def test_ragged_batch_equals_each_alone():
    g = torch.Generator().manual_seed(0)
    trees = [chain([5, 6, 7]), None, DraftTree([5, 5, 6, 6, 7], [-1, -1, 0, 1, 3]), empty_tree(), chain([3])]
    sizes = [len(t) + 1 if t else 1 for t in trees]
    cu_rows = [0]
    for s in sizes:
        cu_rows.append(cu_rows[-1] + s)
    target_tokens = torch.randint(0, 10, (cu_rows[-1],), generator=g)
    target_tokens[0:3] = torch.tensor([5, 6, 0])
    target_tokens[5:11] = torch.tensor([5, 6, 6, 0, 7, 9])
    probs = torch.softmax(torch.randn(cu_rows[-1], 10, generator=g), -1)
    greedy_flags = [True, False, True, False, False]
    ids = [f"r{i}" for i in range(5)]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(5)]
    batch = verify(ids, trees, cu_rows, greedy_flags, target_tokens, probs, gens)
    for i, tree in enumerate(trees):
        lo, hi = cu_rows[i], cu_rows[i + 1]
        tree = tree or empty_tree()
        if greedy_flags[i]:
            alone = verify_greedy(tree, target_tokens[lo:hi].tolist(), ids[i])
        else:
            alone = verify_stochastic(tree, probs[lo:hi], torch.Generator().manual_seed(100 + i), ids[i])
        assert batch[i] == alone
        assert len(emitted_rows(alone)) == len(alone.token_ids)
    assert batch[0].token_ids == [5, 6, 0] and batch[2].num_accepted == 3


def test_verify_rejects_inconsistent_rows():
    with pytest.raises(ValueError):
        verify(["a"], [chain([1, 2])], [0, 2], [True], [1, 2])


# ---------------------------------------------------------------- stochastic: unit cases


def test_stochastic_deterministic_outcomes():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert verify_stochastic(chain([1, 2]), p, g).token_ids == [1, 2, 0]  # p(d) = 1: always accepted
    assert verify_stochastic(chain([0, 2]), p, g).token_ids == [1]  # p(d) = 0: never; recovered = 1
    # Duplicate one-hot siblings: after rejecting token 0 its residual mass is 0, so the copy is too.
    tree = DraftTree([0, 0, 1], [-1, -1, -1])
    r = verify_stochastic(tree, torch.cat([p[:1], p[:1], p[:1], p[:1]]), g)
    assert r.token_ids == [1, 1] and r.accepted_nodes == [2]  # then the bonus from node 2's row
    assert verify_stochastic(empty_tree(), p[:1], g).token_ids == [1]


def test_sample_token():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0])  # unnormalized, with zeros at both ends
    counts = torch.bincount(torch.tensor([verifier.sample_token(probs, g) for _ in range(3000)]), minlength=5)
    assert counts[[0, 2, 4]].sum() == 0 and 900 < counts[3] < 1100  # 1000 expected, sd 26
    with pytest.raises(ValueError):
        verifier.sample_token(torch.zeros(4), g)
    with pytest.raises(ValueError):
        verifier.sample_token(torch.tensor([0.5, float("nan")]), g)


def test_residual():
    p = torch.tensor([0.5, 0.3, 0.2])
    assert torch.allclose(verifier.residual(p, None, 0), torch.tensor([0.0, 0.6, 0.4]))
    assert torch.allclose(verifier.residual(p, torch.tensor([0.2, 0.6, 0.2]), 1), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(verifier.residual(p, p.clone(), 1), p)  # all-zero residual: fall back to p


# ---------------------------------------------------------------- stochastic: lossless distribution

VOCAB, NUM_GEN, START = 5, 3, 0
_g = torch.Generator().manual_seed(1234)
P = torch.softmax(1.5 * torch.randn(VOCAB, VOCAB, generator=_g, dtype=torch.float64), -1).float()  # target
Q = torch.softmax(1.5 * torch.randn(VOCAB, VOCAB, generator=_g, dtype=torch.float64), -1).float()  # drafter


def exact_joint() -> torch.Tensor:  # [VOCAB ** 3], the target's own joint of the first 3 tokens
    return (P[START][:, None, None] * P[:, :, None] * P[None, :, :]).flatten()


Q_LISTS = Q.tolist()


def draw(dist: list[float], rng: random.Random) -> int:  # the drafter's own sampling (not under test)
    return rng.choices(range(VOCAB), weights=dist)[0]


def onehot_chain(last, rng):
    a = int(Q[last].argmax())
    return chain([a, int(Q[a].argmax())])


def sampled_chain(last, rng):
    a = draw(Q_LISTS[last], rng)
    return chain([a, draw(Q_LISTS[a], rng)], Q[[last, a]])


def iid_sibling_tree(last, rng):
    """3 root children drawn iid from the same q, each with one sampled child."""
    roots = [draw(Q_LISTS[last], rng) for _ in range(3)]
    leaves = [draw(Q_LISTS[x], rng) for x in roots]
    return DraftTree(roots + leaves, [-1, -1, -1, 0, 1, 2], Q[[last] * 3 + roots])


def without_replacement_tree(last, rng):
    """2 distinct root children (the second's q has the first token removed), each with a child."""
    a = draw(Q_LISTS[last], rng)
    q2 = list(Q_LISTS[last])
    q2[a] = 0.0
    b = draw(q2, rng)
    q = Q[[last, last, a, b]]
    q[1] = torch.tensor(q2) / sum(q2)
    return DraftTree([a, b, draw(Q_LISTS[a], rng), draw(Q_LISTS[b], rng)], [-1, -1, 0, 1], q)


def onehot_duplicate_tree(last, rng):
    """Deterministic tree with duplicate siblings: [a, a, b] under the root, a chain under the first a."""
    a, b = Q[last].topk(2).indices.tolist()
    return DraftTree([a, a, b, int(Q[a].argmax())], [-1, -1, -1, 0])


def no_drafts(last, rng):
    return empty_tree()


def simulate(drafter, num_trials, seed=0) -> torch.Tensor:
    """Counts [VOCAB ** 3] of the first 3 tokens over num_trials speculative generations."""
    rng = random.Random(seed)
    g_verify = torch.Generator().manual_seed(seed + 1)
    outputs = [[] for _ in range(num_trials)]
    active = list(range(num_trials))
    while active:
        trees = [drafter(outputs[t][-1] if outputs[t] else START, rng) for t in active]
        cu_rows, rows = [0], []
        for t, tree in zip(active, trees):
            rows.append([outputs[t][-1] if outputs[t] else START] + tree.token_ids)
            cu_rows.append(cu_rows[-1] + len(tree) + 1)
        probs = P[torch.tensor([r for rs in rows for r in rs])]
        results = verify([str(t) for t in active], trees, cu_rows, [False] * len(active), None, probs,
                         [g_verify] * len(active))
        for t, result in zip(active, results):
            outputs[t].extend(result.token_ids)
        active = [t for t in active if len(outputs[t]) < NUM_GEN]
    cells = torch.tensor([(o[0] * VOCAB + o[1]) * VOCAB + o[2] for o in outputs])
    return torch.bincount(cells, minlength=VOCAB ** NUM_GEN).double()


def chi2_critical(df: int, alpha: float) -> float:
    """x with P(chi2_df > x) = alpha, by bisection on the regularized upper incomplete gamma."""
    lo, hi = 0.0, 10.0 * df + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        tail = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                             torch.tensor(mid / 2, dtype=torch.float64)))
        lo, hi = (mid, hi) if tail > alpha else (lo, mid)
    return hi


def test_chi2_critical_matches_tables():
    assert chi2_critical(1, 0.05) == pytest.approx(3.841, abs=1e-3)
    assert chi2_critical(10, 0.01) == pytest.approx(23.209, abs=1e-3)
    assert chi2_critical(100, 1e-4) == pytest.approx(161.3, abs=0.5)  # Wilson-Hilferty


def chi2_statistic(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic with cells of expected count < 5 pooled into one; returns (stat, df)."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


NUM_TRIALS = 6_000  # a 10% error in the acceptance rule scores ~2x the critical value (~5 sd)
ALPHA = 1e-4  # a correct verifier fails with probability 1e-4 per case (and never with these seeds)


def lossless_stat(drafter, seed=0) -> tuple[float, float]:
    stat, df = chi2_statistic(simulate(drafter, NUM_TRIALS, seed), exact_joint())
    return stat, chi2_critical(df, ALPHA)


@pytest.mark.parametrize("drafter", [no_drafts, onehot_chain, sampled_chain, iid_sibling_tree,
                                     without_replacement_tree, onehot_duplicate_tree])
def test_speculative_sampling_is_lossless(drafter):
    stat, critical = lossless_stat(drafter)
    assert stat < critical, f"{drafter.__name__}: chi2 {stat:.1f} >= critical {critical:.1f}"


def _recovered_from_p(p, q, token):  # the classic mistake: resample from p after a rejection
    return p


def _accept_10_percent_low(u, p_x, q_x):  # accept with probability 0.9 * min(1, p / q)
    return u * q_x < 0.9 * p_x if p_x < q_x else u < 0.9


@pytest.mark.parametrize("patch, drafter", [
    (("residual", _recovered_from_p), sampled_chain),
    (("accepts", _accept_10_percent_low), sampled_chain),
    (("accepts", _accept_10_percent_low), iid_sibling_tree),
])
def test_wrong_rules_are_caught(monkeypatch, patch, drafter):
    monkeypatch.setattr(verifier, *patch)
    stat, critical = lossless_stat(drafter)
    assert stat > critical, f"{patch[0]} mistake not detected: chi2 {stat:.1f} < critical {critical:.1f}"
