"""Draft refinement (engine/spec/refine.py): the Witten-Bell n-gram LM, the lattice's best paths,
the p-best tree, sampled drafts with their q, and the BPD and PaSS drafters drafting the rescored path."""
from __future__ import annotations

import itertools

import pytest
import torch

from engine.spec.base import depths
from engine.spec.bpd import BpdProposer, DraftHeads
from engine.spec.lookahead import PassProposer
from engine.spec.refine import NgramLM, RefineConfig, Refiner, best_paths, sample_path, trie
from engine.types import Request, SamplingParams, VerifyResult

VOCAB = 6
TEXT = [0, 1, 2, 0, 1, 3, 0, 1, 2, 4]
# After "0 1": 2 twice as often as 3; after "1 2" comes 5, after "1 3" comes 4.
LATTICE_TEXT = [0, 1, 2, 5, 0, 1, 2, 5, 0, 1, 3, 4]
# Head 1 prefers 3 over 2 a little, head 2 prefers 4 over 5 a little: the argmax path is 3 4.
HEAD_LOGITS = [[0, 0, 1.0, 1.2, 0, 0], [0, 0, 0, 0, 1.05, 1.0]]


def test_witten_bell_matches_the_formula_and_every_context_sums_to_one():
    lm = NgramLM(VOCAB, order=3)
    lm.add(TEXT)
    # after (0, 1): 2 twice, 3 once (2 types); after (1,): the same; unigram: 10 tokens, 5 types
    uniform = 1 / VOCAB
    unigram = (2 + 5 * uniform) / (10 + 5)  # p(2): count 2
    bigram = (2 + 2 * unigram) / (3 + 2)
    assert lm.prob([0, 1], 2) == pytest.approx((2 + 2 * bigram) / (3 + 2))
    backed = NgramLM(VOCAB, base=lm)
    backed.extend([5, 5, 0])
    for model in (lm, backed):
        for context in ([], [0], [0, 1], [5, 5], [4, 4]):
            assert sum(model.prob(context, w) for w in range(VOCAB)) == pytest.approx(1.0)
    assert backed.prob([5], 5) > lm.prob([5], 5)  # the request's own text counts


def test_extend_counts_only_what_the_text_gained():
    whole, grown = NgramLM(VOCAB), NgramLM(VOCAB)
    whole.add(TEXT)
    for end in (1, 4, 4, 7, len(TEXT)):
        grown.extend(TEXT[:end])
    assert grown.counts == whole.counts and grown.totals == whole.totals
    assert grown.num_tokens == len(TEXT)


def test_best_paths_are_the_exhaustive_ranking_and_the_lm_can_overrule_the_heads():
    lm = NgramLM(VOCAB)
    lm.add(LATTICE_TEXT)
    logprobs = torch.log_softmax(torch.tensor(HEAD_LOGITS), -1)
    tokens = logprobs.topk(3, -1).indices
    assert best_paths(logprobs, lm, [0, 1], weight=0.0, num_paths=1, top_k=3) == [[3, 4]]
    assert best_paths(logprobs, lm, [0, 1], weight=1.0, num_paths=1, top_k=3) == [[2, 5]]
    ranked = best_paths(logprobs, lm, [0, 1], weight=1.0, num_paths=9, top_k=3)
    scores = []
    for path in ranked:  # every path of the 3 x 3 lattice, scored independently here
        lm_score = torch.tensor([lm.prob([0, 1], path[0]), lm.prob([0, 1, path[0]], path[1])]).log().sum()
        scores.append(float(logprobs[0, path[0]] + logprobs[1, path[1]] + lm_score))
    assert sorted(map(tuple, ranked)) == sorted(itertools.product(tokens[0].tolist(), tokens[1].tolist()))
    assert scores == sorted(scores, reverse=True)
    raw = torch.tensor(HEAD_LOGITS)  # unnormalised logits rank the paths the same
    assert best_paths(raw, lm, [0, 1], weight=1.0, num_paths=9, top_k=3) == ranked


def test_the_lm_offers_its_own_candidates_beside_the_rows_top_k():
    """A row blind to the token before it may rank the right token below its top k; the LM, which
    knows that token, offers its own likeliest next tokens, scored by the row's logit for them."""
    lm = NgramLM(VOCAB)
    lm.add(LATTICE_TEXT)
    assert [t for t, _ in lm.candidates([0, 1], 2)] == [2, 3]  # after "0 1": 2 twice, 3 once
    assert lm.candidates([1, 2], 3) == [(5, lm.prob([1, 2], 5))]  # only what followed this history
    row = torch.tensor([[0, 2.0, 0, 0, 1.0, 0]])  # top 2: tokens 1 and 4; the LM says 2 follows "0 1"
    assert best_paths(row, lm, [0, 1], weight=1.0, num_paths=1, top_k=2) == [[1]]
    assert best_paths(row, lm, [0, 1], weight=1.0, num_paths=1, top_k=2, lm_candidates=1) == [[2]]
    # each later row's candidates follow the path so far: after "1 2" comes 5
    rows = torch.zeros(2, VOCAB)
    assert best_paths(rows, lm, [0, 1], weight=1.0, num_paths=1, top_k=1, lm_candidates=1) == [[2, 5]]


def test_trie_merges_shared_prefixes_best_path_first():
    token_ids, parents = trie([[2, 4], [2, 5], [3, 4]])
    assert token_ids == [2, 4, 5, 3, 4] and parents == [-1, 0, 0, -1, 3]


def test_sampled_drafts_come_from_their_q_rows():
    lm = NgramLM(VOCAB)
    lm.add(LATTICE_TEXT)
    probs = torch.softmax(torch.tensor(HEAD_LOGITS), -1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(VOCAB)
    for _ in range(2000):
        drafts, q = sample_path(probs, lm, [0, 1], weight=1.0, top_k=3, generator=g)
        assert torch.allclose(q.sum(-1), torch.ones(2)) and q[0, drafts[0]] > 0 and q[1, drafts[1]] > 0
        assert int((q[0] > 0).sum()) == 3  # the head's top 3 only
        counts[drafts[0]] += 1
    # q's first row: the head's probabilities times the LM's, over the head's top 3 (3, 2 and one tie)
    _, q = sample_path(probs, lm, [0, 1], weight=1.0, top_k=3, generator=g)
    assert float(q[0, 2]) > float(q[0, 3])  # the LM overruled the head here too
    assert torch.allclose(counts / counts.sum(), q[0], atol=0.035)


def test_sampled_drafts_may_come_from_the_lms_candidates_and_q_says_so():
    lm = NgramLM(VOCAB)
    lm.add(LATTICE_TEXT)
    probs = torch.softmax(torch.tensor([[0, 2.0, 0, 0, 1.0, 0]]), -1)  # top 2: tokens 1 and 4
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(VOCAB)
    for _ in range(2000):
        drafts, q = sample_path(probs, lm, [0, 1], weight=1.0, top_k=2, generator=g, lm_candidates=1)
        counts[drafts[0]] += 1
    assert set(torch.nonzero(q[0]).flatten().tolist()) == {1, 2, 4}  # the LM's 2 joins the row's top 2
    expected = probs[0, [1, 2, 4]] * torch.tensor([lm.prob([0, 1], t) for t in (1, 2, 4)])
    assert torch.allclose(q[0, [1, 2, 4]], expected / expected.sum())
    assert torch.allclose(counts / counts.sum(), q[0], atol=0.035)


def _request(temperature: float) -> Request:
    return Request("r", list(LATTICE_TEXT), 3, SamplingParams(temperature=temperature, max_tokens=64, seed=1))


def test_refined_drafter_drafts_the_rescored_path_and_a_tree_for_two_paths():
    heads = DraftHeads(torch.zeros(2, 4, 4), torch.zeros(2, 4))
    logits = torch.tensor(HEAD_LOGITS)
    # The step emits "0 1", so the heads guess what follows "0 1".
    result = VerifyResult("r", [0, 1], 1, 1, [0])
    plain, refined = BpdProposer(heads), BpdProposer(heads, Refiner(RefineConfig(weight=1.0)))
    two_paths = BpdProposer(heads, Refiner(RefineConfig(weight=1.0, num_paths=2)))
    for proposer, expect in ((plain, [3, 4]), (refined, [2, 5])):
        r = _request(0.0)
        proposer.observe_draft_rows(r, result, logits)
        r.token_ids += result.token_ids
        tree = proposer.propose([r], {"r": 5})["r"]
        assert tree.token_ids == expect and tree.parents == [-1, 0] and tree.draft_probs is None
    r = _request(0.0)
    two_paths.observe_draft_rows(r, result, logits)
    r.token_ids += result.token_ids
    tree = two_paths.propose([r], {"r": 5})["r"]
    assert len(tree.token_ids) in (3, 4) and tree.token_ids[:2] == [2, 5] and tree.parents[:2] == [-1, 0]
    assert tree.parents != [-1, 0, 1]  # a tree, not a chain
    assert two_paths.offer(r, tree, limit=5) == depths(tree)


def test_refined_drafter_gives_sampled_requests_their_q():
    proposer = BpdProposer(DraftHeads(torch.zeros(2, 4, 4), torch.zeros(2, 4)), Refiner(RefineConfig(weight=1.0)))
    r = _request(1.0)
    proposer.observe_draft_rows(r, VerifyResult("r", [0, 1], 1, 1, [0]), torch.randn(2, VOCAB))
    r.token_ids += [0, 1]
    tree = proposer.propose([r], {"r": 5})["r"]
    assert tree.draft_probs.shape == (2, VOCAB)
    assert all(float(tree.draft_probs[i, t]) > 0 for i, t in enumerate(tree.token_ids))
    assert torch.allclose(tree.draft_probs.sum(-1), torch.ones(2))


def test_pass_drafts_the_rescored_chain_even_when_asked_for_two_paths():
    """PaSS's look-ahead rows are refined as BPD's head rows are, always into a chain; a rejected
    step's rows stay dropped."""
    result = VerifyResult("r", [0, 1], 1, 1, [0])
    logits = torch.tensor(HEAD_LOGITS)
    refiner = Refiner(RefineConfig(weight=1.0, num_paths=2))
    plain, refined = PassProposer(torch.zeros(2, 4)), PassProposer(torch.zeros(2, 4), refiner=refiner)
    for proposer, expect in ((plain, [3, 4]), (refined, [2, 5])):
        r = _request(0.0)
        proposer.observe_draft_rows(r, result, logits)
        r.token_ids += result.token_ids
        tree = proposer.propose([r], {"r": 5})["r"]
        assert tree.token_ids == expect and tree.parents == [-1, 0]
    r = _request(0.0)
    refined.observe_draft_rows(r, VerifyResult("r", [0, 2], 2, 1, [0]), logits)  # its 2nd draft rejected
    r.token_ids += [0, 2]
    assert refined.propose([r], {"r": 5}) == {}


def test_refine_config_is_checked():
    for bad in ({"top_k": 0}, {"num_paths": 0}, {"weight": -1.0}):
        with pytest.raises(ValueError):
            RefineConfig(**bad)
