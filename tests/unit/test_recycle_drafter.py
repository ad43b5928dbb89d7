"""The recycle drafter: the module map, drafting over the draft vocabulary (greedy and sampled, batched),
the emitting row's hidden state handed out by verify_step, and --recycle-lossy's unverified drafts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.spec.base import chain
from engine.spec.recycle import RecycleModule, RecycleProposer, recycle
from engine.verify_step import verify_step
from engine.train.recycle import init_module
from engine.types import Request, SamplingParams, ScheduledRequest, VerifyResult

HIDDEN, VOCAB = 8, 12
DRAFT_VOCAB = torch.tensor([3, 5, 7, 9, 11])


def random_module(seed: int = 0) -> RecycleModule:
    g = torch.Generator().manual_seed(seed)
    shapes = [(HIDDEN, 2 * HIDDEN), (HIDDEN,), (16, HIDDEN), (16,), (HIDDEN, 16)]
    return RecycleModule(*(torch.randn(*s, generator=g) * 0.5 for s in shapes), DRAFT_VOCAB)


def bound_proposer(max_depth: int = 3, lossy: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1)
    embed, lm_head = torch.randn(VOCAB, HIDDEN, generator=g), torch.randn(VOCAB, HIDDEN, generator=g)
    proposer = RecycleProposer(random_module(seed), max_depth, lossy)
    proposer.bind_model(embed, lm_head)
    return proposer, embed, lm_head


def ready_request(proposer, rid: str, hidden: torch.Tensor, temperature: float = 0.0, seed: int | None = None):
    r = Request(rid, [1, 2, 3], 3, SamplingParams(temperature=temperature, max_tokens=64, seed=seed))
    proposer.observe_emitted(r, VerifyResult(rid, [4], 0, 0, []), hidden)
    r.token_ids.append(4)
    return r


def test_untrained_module_is_the_identity_and_shapes_are_checked():
    params = init_module(HIDDEN, 16, torch.Generator().manual_seed(0))
    hidden = torch.randn(3, HIDDEN)
    assert torch.equal(recycle(hidden, torch.randn(3, HIDDEN), *params), hidden)
    with pytest.raises(ValueError, match=r"w_in \[H, 2H\]"):
        RecycleModule(torch.zeros(HIDDEN, HIDDEN), *params[1:], DRAFT_VOCAB)
    with pytest.raises(ValueError, match="non-empty vocab"):
        RecycleModule(*params, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="hidden size 8"):
        RecycleProposer(random_module(), 2).bind_model(torch.zeros(VOCAB, 4), torch.zeros(VOCAB, 4))
    with pytest.raises(ValueError, match="draft vocabulary is larger"):
        RecycleProposer(random_module(), 2).bind_model(torch.zeros(6, HIDDEN), torch.zeros(6, HIDDEN))


def test_a_request_is_ready_from_its_emitting_row_until_its_text_moves():
    proposer, _, _ = bound_proposer(max_depth=3)
    r = Request("r", [1, 2, 3], 3, SamplingParams(temperature=0.0, max_tokens=64))
    assert proposer.offer(r, None, limit=5) == [] and proposer.propose([r], {"r": 5}) == {}
    proposer.observe_emitted(r, VerifyResult("r", [4, 5], 2, 1, [0]), torch.zeros(HIDDEN))
    r.token_ids += [4, 5]
    assert proposer.offer(r, None, limit=5) == [1, 2, 3] and proposer.offer(r, None, limit=2) == [1, 2]
    r.token_ids.append(6)
    assert proposer.offer(r, None, limit=5) == []
    lossy, _, _ = bound_proposer(lossy=True)
    assert lossy.offer(ready_request(lossy, "l", torch.zeros(HIDDEN)), None, limit=5) == []  # outside the plan


def test_greedy_drafts_follow_the_module_over_the_draft_vocabulary_batched_or_not():
    proposer, embed, lm_head = bound_proposer()
    hiddens = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(5))
    reqs = [ready_request(proposer, f"r{i}", hiddens[i]) for i in range(2)]
    trees = proposer.draft(reqs, [3, 1])
    hidden, token, expected = hiddens[0], 4, []
    for _ in range(3):
        hidden = recycle(hidden[None], embed[[token]], *proposer.module.params())[0]
        token = int(DRAFT_VOCAB[(lm_head[DRAFT_VOCAB] @ hidden).argmax()])
        expected.append(token)
    assert trees["r0"].token_ids == expected and trees["r0"].draft_probs is None
    assert trees["r1"].token_ids == proposer.draft([reqs[1]], [1])["r1"].token_ids  # alone = batched
    assert len(trees["r1"]) == 1 and set(trees["r1"].token_ids) <= set(DRAFT_VOCAB.tolist())


def test_sampled_drafts_carry_q_over_the_draft_vocabulary():
    proposer, embed, lm_head = bound_proposer()
    hidden = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(6))
    r = ready_request(proposer, "s", hidden, temperature=0.7, seed=3)
    short = ready_request(proposer, "t", hidden, temperature=0.7, seed=4)
    trees = proposer.draft([r, short], [2, 1])
    assert len(trees["t"]) == 1 and trees["t"].draft_probs.shape == (1, VOCAB)  # no rows past its depth
    tree = trees["s"]
    q = tree.draft_probs
    assert q.shape == (2, VOCAB)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[DRAFT_VOCAB] = False
    assert torch.all(q[:, outside] == 0) and torch.allclose(q.sum(-1), torch.ones(2))
    first = recycle(hidden[None], embed[[4]], *proposer.module.params())[0]
    torch.testing.assert_close(q[0, DRAFT_VOCAB], F.softmax(lm_head[DRAFT_VOCAB] @ first / 0.7, dim=-1))
    assert all(q[i, t] > 0 for i, t in enumerate(tree.token_ids))


def test_verify_step_hands_each_request_its_emitting_rows_hidden_state():
    reqs = [Request(f"r{i}", [1, 2, 3], 2, SamplingParams(temperature=0.0, max_tokens=64)) for i in range(2)]
    entries = [ScheduledRequest(reqs[0], 1, chain([4, 5]), max_draft_tokens=2), ScheduledRequest(reqs[1], 1, chain([6]))]
    logits = torch.zeros(3 + 2, VOCAB)
    logits[0, 4] = logits[1, 1] = 5.0  # r0 accepts one draft of two: emitted at row 1
    logits[3, 6] = logits[4, 2] = 5.0  # r1 accepts its draft: emitted at row 1 (its second)
    hidden = torch.arange(5, dtype=torch.float32)[:, None] * torch.ones(1, HIDDEN)
    verified = verify_step(logits, entries, {}, hidden_states=hidden)
    assert [v.result.token_ids for v in verified] == [[4, 1], [6, 2]]
    assert [float(v.emitted_hidden[0]) for v in verified] == [1.0, 4.0]
    assert verify_step(logits, entries, {})[0].emitted_hidden is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_unverified_drafts_are_kept_and_the_bonus_token_is_the_models(temperature):
    """--recycle-lossy: the model rejects both drafts, yet both are kept; the last row gives the bonus."""
    r = Request("r", [1, 2, 3], 2, SamplingParams(temperature=temperature, max_tokens=64, seed=0))
    entries = [ScheduledRequest(r, 1, chain([7, 8]), max_draft_tokens=2)]
    logits = torch.full((3, VOCAB), -30.0)
    logits[0, 1] = logits[1, 2] = logits[2, 9] = 30.0
    assert verify_step(logits, entries, {})[0].result.token_ids == [1]
    kept = verify_step(logits, entries, {}, unverified={"r"})[0]
    assert kept.result.token_ids == [7, 8, 9] and kept.result.num_accepted == 2
    assert kept.logprobs == [None] * 3 and logits[0, 1] == 30.0  # the model's own rows are untouched
