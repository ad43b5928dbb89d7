"""BPD heads: the head map, the drafter's pending drafts, the runner's head rows (plain and split into
prompt / decode forwards), and the verifier picking the row that emitted the last token."""
from __future__ import annotations

import pytest
import torch

from engine.config import CacheConfig, ModelConfig
from engine.model_runner import ModelRunner
from engine.spec.base import chain
from engine.spec.bpd import HEAD_ROW_SHARE, SAMPLED_ROWS_PER_DRAFT, BpdProposer, DraftHeads
from engine.verify_step import verify_step
from engine.types import Request, SamplingParams, ScheduledRequest, SchedulerOutput, VerifyResult

VOCAB = 10


def random_heads(num_heads: int, hidden: int, seed: int = 0, scale: float = 0.3) -> DraftHeads:
    g = torch.Generator().manual_seed(seed)
    return DraftHeads(torch.randn(num_heads, hidden, hidden, generator=g) * scale / hidden ** 0.5,
                      torch.randn(num_heads, hidden, generator=g) * scale)


def test_zero_heads_are_the_identity_and_shapes_are_checked():
    hidden = torch.randn(3, 8)
    out = DraftHeads(torch.zeros(2, 8, 8), torch.zeros(2, 8)).apply(hidden)
    assert torch.equal(out, hidden.repeat_interleave(2, dim=0))  # row n's two heads, together
    heads = random_heads(2, 8)
    manual = hidden[1] + torch.nn.functional.silu(heads.weight[1] @ hidden[1] + heads.bias[1])
    torch.testing.assert_close(heads.apply(hidden)[3], manual)
    with pytest.raises(ValueError, match=r"weight \[K, H, H\]"):
        DraftHeads(torch.zeros(2, 8, 4), torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"bias \[K, H\]"):
        DraftHeads(torch.zeros(2, 8, 8), torch.zeros(3, 8))


def test_drafts_are_the_emitting_rows_head_guesses_until_the_text_moves():
    proposer = BpdProposer(DraftHeads(torch.zeros(2, 4, 4), torch.zeros(2, 4)))
    r = Request("r", [1, 2, 3], 2, SamplingParams(temperature=0.0, max_tokens=64))
    assert proposer.offer(r, None, limit=5) == [1, 2]  # none pending: the heads' next drafts
    assert proposer.offer(r, None, limit=1) == [1]
    logits = torch.zeros(2, VOCAB)
    logits[0, 7] = logits[1, 8] = 5.0
    proposer.observe_draft_rows(r, VerifyResult("r", [5, 6], 2, 1, [0]), logits)  # a rejection does not matter
    r.token_ids += [5, 6]
    tree = proposer.propose([r], {"r": 5})["r"]
    assert tree.token_ids == [7, 8] and tree.draft_probs is None
    assert proposer.offer(r, tree, limit=5) == [1, 2]
    assert proposer.propose([r], {"r": 1})["r"].token_ids == [7]
    r.token_ids.append(9)
    assert proposer.propose([r], {"r": 5}) == {}


def test_a_draft_is_charged_its_verify_row_and_its_share_of_the_measured_head_rows():
    proposer = BpdProposer(DraftHeads(torch.zeros(2, 4, 4), torch.zeros(2, 4)))
    assert proposer.rows_per_draft(None) == pytest.approx(1 + 2 * HEAD_ROW_SHARE * SAMPLED_ROWS_PER_DRAFT)
    proposer.head_row_share = 0.5  # an lm_head row costing half a row (measured by the engine at start-up)
    assert proposer.rows_per_draft(chain([1, 2])) == pytest.approx(1 + 2 * 0.5 * SAMPLED_ROWS_PER_DRAFT)


def test_verify_step_hands_each_request_the_rows_of_its_last_emitted_token():
    """Two requests with heads (K = 2) and one without; head rows come per sampled row."""
    reqs = [Request(f"r{i}", [1, 2, 3], 2, SamplingParams(temperature=0.0, max_tokens=64)) for i in range(3)]
    drafts = [chain([4, 5]), None, chain([6])]
    entries = [ScheduledRequest(r, 1, d, max_draft_tokens=2, draft_heads=i != 1)
               for i, (r, d) in enumerate(zip(reqs, drafts))]
    logits = torch.zeros(3 + 1 + 2, VOCAB)
    logits[0, 4] = logits[1, 5] = logits[2, 9] = 5.0  # r0 accepts both drafts: emitted at row 2
    logits[3, 1] = 5.0
    logits[4, 3] = 5.0  # r2 rejects its draft: emitted at row 0
    head_logits = torch.arange((3 + 2) * 2, dtype=torch.float32)[:, None] * torch.ones(1, VOCAB)
    verified = verify_step(logits, entries, {}, head_logits=head_logits, num_heads=2)
    assert [v.result.token_ids for v in verified] == [[4, 5, 9], [1], [3]]
    assert verified[0].draft_rows[:, 0].tolist() == [4.0, 5.0]  # r0's row 2, heads 1 and 2
    assert verified[1].draft_rows is None
    assert verified[2].draft_rows[:, 0].tolist() == [6.0, 7.0]  # r2's row 0 follows r0's 3 rows


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_runner_head_rows_are_the_heads_of_the_sampled_rows(tiny_model_dir, dtype):
    """The head rows equal the lm_head over the heads of the sampled rows' hidden states, also when
    a prompt chunk in the step sends the int8 runner through two forwards (merged back in order)."""
    runner = ModelRunner(ModelConfig.from_hf_dir(tiny_model_dir), tiny_model_dir, CacheConfig(4, 512), dtype=dtype)
    heads = random_heads(2, runner.model_config.hidden_size)
    runner.set_heads(heads)
    a = Request("a", list(range(100, 110)), 10, SamplingParams(), block_ids=list(range(0, 8)))
    b = Request("b", list(range(200, 206)), 6, SamplingParams(), block_ids=list(range(8, 16)))
    runner.execute(SchedulerOutput([ScheduledRequest(a, 9)]))
    a.num_computed_tokens = 9
    out = runner.execute(SchedulerOutput([ScheduledRequest(a, 1, chain([7, 8]), max_draft_tokens=2, draft_heads=True),
                                          ScheduledRequest(b, 6, draft_heads=True)]))
    assert out.logits.shape[0] == 3 + 1 and out.head_logits.shape[0] == (3 + 1) * 2
    expected = runner.model.compute_logits(runner.heads.apply(out.hidden_states))
    torch.testing.assert_close(out.head_logits, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no heads are loaded"):
        runner.set_heads(None)
        runner.execute(SchedulerOutput([ScheduledRequest(b, 6, draft_heads=True)]))
