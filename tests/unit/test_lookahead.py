"""PaSS drafter parts without a model: pending drafts, row plans, observing look-ahead rows, the
runner's layout of look-ahead rows, slot splitting and the controller's price of a PaSS draft."""
from __future__ import annotations

import pytest
import torch

from engine.model_runner import request_layout
from engine.spec.base import chain
from engine.spec.controller import DraftController, StepCostModel
from engine.spec.lookahead import PassProposer, RowPlan
from engine.speculation import attach_drafts
from engine.types import Request, SamplingParams, ScheduledRequest, SchedulerOutput, VerifyResult

VOCAB = 10


def make_request(rid="r", tokens=(1, 2, 3, 4), temperature=0.0, seed=None) -> Request:
    return Request(rid, list(tokens), 2, SamplingParams(temperature=temperature, seed=seed, max_tokens=64))


def la_logits(*argmaxes: int) -> torch.Tensor:
    logits = torch.zeros(len(argmaxes), VOCAB)
    for i, t in enumerate(argmaxes):
        logits[i, t] = 5.0
    return logits


def test_drafts_come_from_the_look_ahead_rows_and_go_stale():
    proposer = PassProposer(torch.zeros(3, 4))
    r = make_request()
    assert proposer.propose([r], {"r": 5}) == {}
    # A step with 1 draft, all accepted: the tokens [d, bonus] join the text, rows 7, 8, 9 are the drafts.
    proposer.observe_draft_rows(r, VerifyResult("r", [5, 6], 1, 1, [0]), la_logits(7, 8, 9))
    r.token_ids += [5, 6]
    tree = proposer.propose([r], {"r": 5})["r"]
    assert tree.token_ids == [7, 8, 9] and tree.parents == [-1, 0, 1] and tree.draft_probs is None
    assert proposer.propose([r], {"r": 2})["r"].token_ids == [7, 8]
    r.token_ids.append(1)  # the text moved on without them
    assert proposer.propose([r], {"r": 5}) == {}


def test_a_rejection_drops_the_look_ahead_rows():
    proposer = PassProposer(torch.zeros(3, 4))
    r = make_request()
    proposer.observe_draft_rows(r, VerifyResult("r", [5, 2], 2, 1, [0]), la_logits(7, 8, 9))
    r.token_ids += [5, 2]
    assert proposer.propose([r], {"r": 5}) == {}


def test_sampled_drafts_carry_their_q():
    proposer = PassProposer(torch.zeros(2, 4))
    r = make_request(temperature=1.0, seed=3)
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    proposer.observe_draft_rows(r, VerifyResult("r", [5], 0, 0, []), logits)
    r.token_ids.append(5)
    tree = proposer.propose([r], {"r": 5})["r"]
    assert torch.allclose(tree.draft_probs, torch.softmax(logits, -1))
    assert all(tree.draft_probs[i, t] > 0 for i, t in enumerate(tree.token_ids))


@pytest.mark.parametrize("mode,pending,keep,expected", [
    ("fused", None, 3, RowPlan(0, 3)),      # nothing pending: a drafting step
    ("two_call", None, 2, RowPlan(0, 2)),
    ("fused", 3, 3, RowPlan(3, 3)),         # verify 3 and draft the next block in the same pass
    ("fused", 3, 1, RowPlan(1, 2)),         # a cut chain re-drafts one deeper, so it can grow back
    ("two_call", 3, 3, RowPlan(3, 0)),      # the paper: a validation call drafts nothing
    ("fused", 3, 0, RowPlan(0, 0)),         # the controller says drafting does not pay
    ("branch", None, 2, RowPlan(0, 2)),
    ("branch", 3, 1, RowPlan(1, 3)),        # verify 1, and beside it draft for the step after a rejection
])
def test_row_plans(mode, pending, keep, expected):
    proposer = PassProposer(torch.zeros(3, 4), mode)
    tree = chain([1] * pending) if pending else None
    assert proposer.offer(make_request(), tree, 5) == list(range(1, (pending or 3) + 1))
    assert proposer.plan(tree, keep, 5) == expected


def test_layout_appends_look_ahead_rows_after_the_chain():
    r = make_request(tokens=range(10))
    r.num_computed_tokens = 9
    r.block_ids = [0, 1, 2, 3]
    lay = request_layout(ScheduledRequest(r, 1, chain([7, 8]), max_draft_tokens=5, num_lookahead=3))
    assert lay.positions == [9, 10, 11, 12, 13, 14]
    assert lay.cache_indices == [9, 10, 11, 12, 13, 14] and lay.kv_len == 15
    assert lay.sample_rows == [0, 1, 2] and lay.lookahead_rows == [3, 4, 5] and lay.tree_block is None
    tree = chain([7, 8])
    tree.parents = [-1, -1]
    with pytest.raises(ValueError, match="chain"):
        request_layout(ScheduledRequest(r, 1, tree, max_draft_tokens=5, num_lookahead=1))


def test_branch_layout_puts_look_ahead_rows_beside_the_chain():
    """--pass-mode branch: the rows continue the last real token (positions 10, 11), see the text and
    each other only, and take the cache indices after the drafts, which see none of them."""
    r = make_request(tokens=range(10))
    r.num_computed_tokens = 9
    r.block_ids = [0, 1, 2, 3]
    lay = request_layout(ScheduledRequest(r, 1, chain([7, 8]), max_draft_tokens=5, num_lookahead=2,
                                          lookahead_from_root=True))
    assert lay.positions == [9, 10, 11, 10, 11] and lay.cache_indices == [9, 10, 11, 12, 13]
    assert lay.sample_rows == [0, 1, 2] and lay.lookahead_rows == [3, 4] and lay.kv_len == 14
    assert lay.tree_block == [[True, False, False, False, False], [True, True, False, False, False],
                              [True, True, True, False, False], [True, False, False, True, False],
                              [True, False, False, True, True]]
    no_draft = request_layout(ScheduledRequest(r, 1, None, max_draft_tokens=5, num_lookahead=2,
                                               lookahead_from_root=True))
    assert no_draft.positions == [9, 10, 11] and no_draft.tree_block is None  # a drafting step: plain causal


@pytest.mark.parametrize("mode,num_accepted,valid", [
    ("fused", 2, True), ("fused", 0, False), ("branch", 0, True), ("branch", 1, False), ("branch", 2, False),
])
def test_look_ahead_rows_draft_only_for_the_text_they_continue(mode, num_accepted, valid):
    """A step verified 2 drafts: rows after them (fused) hold for an all-accepted step, rows beside
    them (branch) for an all-rejected one."""
    proposer = PassProposer(torch.zeros(2, 4), mode=mode)
    r = make_request()
    tokens = [5, 6, 7][:num_accepted + 1]
    proposer.observe_draft_rows(r, VerifyResult("r", tokens, 2, num_accepted, [0]), la_logits(8, 9))
    r.token_ids += tokens
    assert (proposer.propose([r], {"r": 5}) != {}) == valid


def test_attach_gives_drafts_the_reserved_slots_first():
    r = make_request()
    r.num_computed_tokens = 3
    s = ScheduledRequest(r, 1, max_draft_tokens=4)
    attach_drafts(SchedulerOutput([s]), {"r": chain([1, 2, 3])}, {"r": 3})
    assert len(s.draft) == 3 and s.num_lookahead == 1


def test_controller_prices_a_pass_draft_at_two_rows():
    controller = DraftController(StepCostModel({1: 1.0, 2: 1.25, 3: 1.5, 4: 1.75, 8: 2.75}))
    offers = {"r": (make_request(), "pass", [1, 2, 3])}
    # No record yet: alpha 0.5. The first draft gains 0.5 token for 0.25 more cost at 1 row per
    # draft (rate 1.2 > 1), but for 0.5 at 2 rows (rate 1.0, no gain): PaSS must not draft there.
    assert controller.plan(offers, 1) == {"r": 1}
    assert controller.plan(offers, 1, {"r": 2.0}) == {}


@pytest.mark.parametrize("mode,rows_to_draft,rows_to_validate", [
    ("two_call", 2.0, 1.0),  # the drafting step's look-ahead row is paid for by validation time
    ("fused", 3.0, 3.0), ("branch", 2.5, 2.5),  # every verify pass drafts the next step's rows too
])
def test_a_pass_draft_is_charged_the_rows_still_to_pay(mode, rows_to_draft, rows_to_validate):
    proposer = PassProposer(torch.zeros(2, 4), mode)
    assert proposer.rows_per_draft(None) == rows_to_draft
    assert proposer.rows_per_draft(chain([1])) == rows_to_validate
