"""specd_kernels/rejection: the Triton kernel against the reference (engine/verifier.py's rules).

Greedy must agree exactly (ragged batches of chains and trees, 0 to 127 nodes, tie-breaking).
Stochastic draws use other random streams (Philox per request seed), so they are checked
(1) exactly where the outcome is deterministic (one-hot targets, vocabularies of several chunks),
and (2) in distribution: the joint law of (accepted path, final token) over many seeds against the
exact law of recursive rejection, enumerated with the verifier's own residual rule.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

pytest.importorskip("triton")

from engine.spec.base import children  # noqa: E402
from engine.types import DraftTree  # noqa: E402
from engine.verifier import residual, verify  # noqa: E402
from specd_kernels import rejection  # noqa: E402
from specd_kernels.rejection import ref  # noqa: E402
from tests.unit.test_verifier import chi2_critical, chi2_statistic  # noqa: E402


def _flat(trees: list[DraftTree], device):
    tokens = [t for tree in trees for t in tree.token_ids]
    parents = [p for tree in trees for p in tree.parents]
    cu = [0]
    for tree in trees:
        cu.append(cu[-1] + len(tree))
    return (torch.tensor(tokens, dtype=torch.int64, device=device),
            torch.tensor(parents, dtype=torch.int32, device=device),
            torch.tensor(cu, dtype=torch.int32, device=device))


def _random_tree(num_nodes: int, gen: torch.Generator, chain: bool = False) -> list[int]:
    return [j - 1 if chain else int(torch.randint(-1, j, (1,), generator=gen)) for j in range(num_nodes)]


def _greedy_batch(sizes, vocab, seed, device):
    """Trees whose drafts often match the target (so paths get long), with duplicate siblings."""
    gen = torch.Generator().manual_seed(seed)
    trees, targets = [], []
    for i, n in enumerate(sizes):
        parents = _random_tree(n, gen, chain=i % 3 == 0)
        target = torch.randint(0, vocab, (n + 1,), generator=gen).tolist()
        tokens = [target[p + 1] if torch.rand(1, generator=gen) < 0.7 else int(torch.randint(0, vocab, (1,),
                  generator=gen)) for p in parents]
        trees.append(DraftTree(tokens, parents))
        targets += target
    return trees, torch.tensor(targets, dtype=torch.int64, device=device)


def _assert_same(a: ref.Acceptance, b: ref.Acceptance) -> None:
    for name in ("num_accepted", "accepted_nodes", "final_token_ids"):
        assert torch.equal(getattr(a, name).cpu(), getattr(b, name).cpu()), name


@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("seed", range(3))
def test_greedy_equals_reference(seed, device):
    sizes = [0, 1, 7, 3, 0, 12, 5, 2, 9][: 5 + seed * 2]
    trees, targets = _greedy_batch(sizes, vocab=[5, 50, 49152][seed], seed=seed, device=device)
    tokens, parents, cu = _flat(trees, device)
    greedy = torch.ones(len(trees), dtype=torch.bool, device=device)
    expected = ref.accept(tokens.cpu(), parents.cpu(), cu.cpu(), greedy.cpu(), targets.cpu())
    _assert_same(rejection.accept(tokens, parents, cu, greedy, targets), expected)


@pytest.mark.usefixtures("force_triton")
def test_greedy_largest_tree_and_ties(device):
    """127-node tree (the attention limit is 128 new tokens) next to the verifier's tie cases."""
    trees, targets = _greedy_batch([127], vocab=3, seed=9, device=device)
    # Tie: both branches match for two nodes; the first-listed child (node 0) wins, not the lower row.
    trees.append(DraftTree([5, 6, 7, 8], [-1, -1, 1, 0]))
    targets = torch.cat([targets, torch.tensor([5, 8, 7, 1, 2], device=device)])
    tokens, parents, cu = _flat(trees, device)
    greedy = torch.ones(2, dtype=torch.bool, device=device)
    out = rejection.accept(tokens, parents, cu, greedy, targets)
    _assert_same(out, ref.accept(tokens.cpu(), parents.cpu(), cu.cpu(), greedy.cpu(), targets.cpu()))
    assert out.accepted_nodes[1, :2].tolist() == [0, 3] and int(out.final_token_ids[1]) == 2


def _one_hot_rows(trees, vocab, seed, device):
    """One-hot targets (p = 1 on one token per row) drawn from the drafts half of the time: rejection
    sampling is then deterministic, so the kernel must agree with the reference draw for draw."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for tree in trees:
        kids = children(tree)
        for row in range(len(tree) + 1):
            options = [tree.token_ids[c] for c in kids[row]]
            if options and torch.rand(1, generator=gen) < 0.6:
                rows.append(options[int(torch.randint(0, len(options), (1,), generator=gen))])
            else:
                rows.append(int(torch.randint(0, vocab, (1,), generator=gen)))
    return torch.nn.functional.one_hot(torch.tensor(rows), vocab).float().to(device)


@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("with_q", [False, True], ids=["one_hot_q", "sampled_q"])
def test_stochastic_deterministic_cases_equal_reference(with_q, device):
    vocab = 2500  # three vocabulary chunks: the residual and the inverse CDF cross chunk borders
    gen = torch.Generator().manual_seed(int(with_q))
    trees = []
    for n in [0, 3, 6, 1, 4]:
        parents = _random_tree(n, gen)
        trees.append(DraftTree(torch.randint(0, vocab, (n,), generator=gen).tolist(), parents))
    tokens, parents, cu = _flat(trees, device)
    probs = _one_hot_rows(trees, vocab, seed=3, device=device)
    q = torch.softmax(torch.randn(len(tokens), vocab, generator=gen), -1).to(device) if with_q else None
    greedy = torch.tensor([False, True, False, False, True], device=device)  # modes interleave
    targets = probs.argmax(-1)
    seeds = torch.arange(5, dtype=torch.int64, device=device) * 1_000_003
    out = rejection.accept(tokens, parents, cu, greedy, targets, probs, q, seeds)
    expected = ref.accept(tokens.cpu(), parents.cpu(), cu.cpu(), greedy.cpu(), targets.cpu(), probs.cpu(),
                          None if q is None else q.cpu(), seeds.cpu())
    _assert_same(out, expected)


# ---------------------------------------------------------------- distribution

VOCAB = 4
_g = torch.Generator().manual_seed(77)
P = torch.softmax(2.0 * torch.randn(8, VOCAB, generator=_g, dtype=torch.float64), -1).float()
Q = torch.softmax(2.0 * torch.randn(8, VOCAB, generator=_g, dtype=torch.float64), -1).float()
CHAIN = DraftTree([1, 2], [-1, 0], Q[:2].clone())  # a sampled chain, q given
SIBLINGS = DraftTree([0, 0, 3, 1], [-1, -1, -1, 0])  # one-hot q, duplicate siblings, a grandchild


def exact_outcomes(tree: DraftTree, probs: torch.Tensor) -> dict[tuple, float]:
    """P((accepted nodes, final token)) of recursive rejection, by enumeration: child c of the
    current target p is accepted with probability min(1, p(x) / q(x)); else p <- residual."""
    kids, q, law = children(tree), tree.draft_probs, Counter()

    def walk(row: int, target: torch.Tensor, mass: float, path: tuple) -> None:
        for c in kids[row]:
            x = tree.token_ids[c]
            one_hot = q is None or float(q[c, x]) <= 0.0
            accept = min(1.0, float(target[x]) / (1.0 if one_hot else float(q[c, x])))
            walk(c + 1, probs[c + 1], mass * accept, path + (c,))
            target, mass = residual(target, None if one_hot else q[c], x), mass * (1.0 - accept)
        for token, p in enumerate((target / target.sum()).tolist()):
            law[(path, token)] += mass * p

    walk(0, probs[0], 1.0, ())
    return law


@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("tree, interpreted_copies", [(CHAIN, 240), (SIBLINGS, 160)],
                         ids=["sampled_chain", "one_hot_siblings"])
def test_stochastic_distribution(tree, interpreted_copies, device):
    """Many copies of one tree, one seed each, in one launch: their outcomes follow the exact law.
    The interpreter affords a few hundred draws (~50 ms each), enough to catch gross errors such as
    resampling from p after a rejection or drawing a zero-probability token; a GPU runs 200k."""
    copies = 200_000 if device == "cuda" else interpreted_copies
    probs = P[: len(tree) + 1]
    q = tree.draft_probs
    tokens, parents, cu = _flat([tree] * copies, device)
    all_probs = probs.repeat(copies, 1).to(device)
    all_q = q.repeat(copies, 1).to(device) if q is not None else None
    seeds = torch.randint(0, 2 ** 62, (copies,), generator=torch.Generator().manual_seed(5)).to(device)
    greedy = torch.zeros(copies, dtype=torch.bool, device=device)
    out = rejection.accept(tokens, parents, cu, greedy, None, all_probs, all_q, seeds)
    law = exact_outcomes(tree, probs)
    cells = sorted(law)
    index = {cell: i for i, cell in enumerate(cells)}
    counts = torch.zeros(len(cells), dtype=torch.float64)
    for k, nodes, final in zip(out.num_accepted.tolist(), out.accepted_nodes.tolist(), out.final_token_ids.tolist()):
        cell = (tuple(nodes[:k]), final)
        assert law.get(cell, 0.0) > 0.0, f"impossible outcome {cell}"
        counts[index[cell]] += 1
    stat, df = chi2_statistic(counts, torch.tensor([law[c] for c in cells], dtype=torch.float64))
    assert stat < chi2_critical(df, 1e-4), f"chi2 {stat:.1f} on {df} df"


def test_exact_law_matches_the_reference_verifier():
    """The enumeration above is itself checked against engine/verifier.py's sampling (CPU, cheap)."""
    for tree in (CHAIN, SIBLINGS):
        probs = P[: len(tree) + 1]
        law = exact_outcomes(tree, probs)
        assert abs(sum(law.values()) - 1.0) < 1e-6
        gen = torch.Generator().manual_seed(11)
        counts = Counter()
        trials = 2000
        results = verify([""] * trials, [tree] * trials, [i * (len(tree) + 1) for i in range(trials + 1)],
                         [False] * trials, None, probs.repeat(trials, 1), [gen] * trials)
        for r in results:
            counts[(tuple(r.accepted_nodes), r.token_ids[-1])] += 1
        cells = sorted(set(law) | set(counts))
        stat, df = chi2_statistic(torch.tensor([counts[c] for c in cells], dtype=torch.float64),
                                  torch.tensor([law.get(c, 0.0) for c in cells], dtype=torch.float64))
        assert stat < chi2_critical(df, 1e-4)


def test_reference_layout_checks():
    tokens, parents, cu = _flat([DraftTree([1, 2], [-1, 0])], "cpu")
    with pytest.raises(AssertionError):
        ref.accept(tokens, parents.long(), cu, torch.ones(1, dtype=torch.bool), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(AssertionError):  # rows must be nodes + batch
        ref.accept(tokens, parents, cu, torch.ones(1, dtype=torch.bool), torch.zeros(2, dtype=torch.int64))
