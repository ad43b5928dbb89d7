"""DraftTree helpers (engine/spec/base.py): chains, depths, children, paths and the tree mask."""
from __future__ import annotations

import pytest
import torch

from engine.spec.base import (NoProposer, Proposer, chain, children, depths, empty_tree, is_chain, path_to,
                              tree_attention_mask, validate)
from engine.spec.ngram import NgramProposer
from engine.types import DraftTree

#        root
#       /    \
#      0(5)   1(6)
#     /  \      \
#   2(7) 3(8)   4(9)
#    |
#   5(10)
TREE = DraftTree(token_ids=[5, 6, 7, 8, 9, 10], parents=[-1, -1, 0, 0, 1, 2])


def test_chain():
    tree = chain([4, 5, 6])
    assert tree.token_ids == [4, 5, 6] and tree.parents == [-1, 0, 1] and tree.draft_probs is None
    assert is_chain(tree) and not is_chain(TREE)
    assert len(chain([])) == 0 and len(empty_tree()) == 0
    q = torch.full((2, 3), 1 / 3)
    assert chain([1, 2], q).draft_probs is q


def test_depths_children_paths():
    assert depths(TREE) == [1, 1, 2, 2, 2, 3]
    assert children(TREE) == [[0, 1], [2, 3], [4], [5], [], [], []]
    assert path_to(TREE, 5) == [0, 2, 5]
    assert path_to(TREE, 4) == [1, 4]
    assert path_to(TREE, -1) == []
    assert depths(chain([1, 2, 3])) == [1, 2, 3]


def test_chain_mask_is_causal():
    mask = tree_attention_mask(chain([1, 2, 3, 4]))
    assert mask.dtype == torch.bool and mask.shape == (5, 5)
    assert torch.equal(mask, torch.tril(torch.ones(5, 5, dtype=torch.bool)))
    assert torch.equal(tree_attention_mask(empty_tree()), torch.ones(1, 1, dtype=torch.bool))


def test_tree_mask_is_self_plus_ancestors():
    mask = tree_attention_mask(TREE)
    n = len(TREE)
    for j in range(n + 1):
        expected = {0, j} | {a + 1 for a in path_to(TREE, j - 1)}
        assert {k for k in range(n + 1) if mask[j, k]} == expected
    assert mask[:, 0].all()  # everybody sees the root


def test_validate():
    validate(TREE)
    with pytest.raises(ValueError):
        validate(DraftTree([1, 2], [-1, 1]))  # a node can't be its own parent
    with pytest.raises(ValueError):
        validate(DraftTree([1, 2], [1, -1]))  # parents must precede children
    with pytest.raises(ValueError):
        validate(DraftTree([1, 2], [-1]))
    with pytest.raises(ValueError):
        validate(chain([1, 2], torch.ones(3, 4)))


def test_proposers_satisfy_protocol():
    assert isinstance(NoProposer(), Proposer) and isinstance(NgramProposer(), Proposer)
    assert NoProposer().propose([], {}) == {}
