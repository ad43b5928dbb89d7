"""`--spec pass`: PaSS look-ahead embeddings.

Monea, Joulin, Grave 2023, "PaSS: Parallel Speculative Sampling". L learned embeddings a_1..a_L
(L x d_model parameters, nothing else) are appended to the input after the last real token x_t.
The model's output at x_t is the exact next-token distribution; its output at a_i (position t + i)
is a draft distribution q_i for the token at t + 1 + i. So one forward both emits a real token and
drafts the L tokens after it; the next forward verifies them (speculative sampling, lossless).

Two ways to run it, both batched with every other request of the step (EMS-SD):
- `two_call` (the paper): iterations alternate a drafting call, `[x_t, a_1..a_L]` (emits one token
  exactly, drafts L more), and a validation call, `[x_t', d_1..d_L]` (emits the accepted drafts
  plus the bonus/recovered token). In the engine they are two consecutive steps of one request.
- `fused`: the look-ahead embeddings ride along in every verify pass, after the drafts:
  `[x_t, d_1..d_n, a_1..a_L]`. The rows a_i are conditioned on all n drafts being right; when they
  all are, the bonus token is the token at a_1's position and the a_i rows are exactly the next
  iteration's drafts, so one call both verifies and drafts. After a rejection they are conditioned
  on a wrong token and are dropped; the next step is a drafting-only `[x_t, a_1..a_L]`.
- `branch`: the look-ahead rows ride in every verify pass too, but beside the drafts: they continue
  x_t (positions t+1.., attending the text and each other, not the drafts). They are the next
  drafts exactly when every draft is rejected, which at this acceptance is the usual case, where
  `fused` then needs a drafting-only step; after an acceptance `branch` needs one instead. With
  acceptance alpha per single draft that is (1 + 2 alpha) / (1 + alpha) tokens per step, against
  2 / (2 - alpha) for `fused` and (2 + alpha) / 2 for `two_call` (1.25 / 1.20 / 1.17 at alpha 1/3),
  for 1 + drafts + L rows a step, which the dev CPU computes for about the price of one up to 3 rows.

Drafts carry their q: greedy requests draft the argmax (q = one-hot, `draft_probs` None), sampled
requests draw d_i ~ q_i = the request's temperature / top-k / top-p applied to the a_i row, from the
request's own generator, and the verifier's min(1, p/q) test keeps the output distribution exact.
By default the rows are refined first (engine/spec/refine.py, as BPD's heads are): a_1 guesses the
token after the one its own forward emits without knowing it, and an n-gram LM that does know it
rescores the rows' top-k lattice (greedy: the best path; sampled: q reweighted by the LM).

Per-request state (`request.state["pass"]`, a PendingDrafts): the drafts and the text length they continue.
The embeddings come from a trained artifact (engine/train/pass_.py, artifacts/pass/).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import PASS_MODES as MODES
from engine.spec.base import pending, propose_pending, set_pending
from engine.spec.refine import Refiner
from engine.types import DraftTree, Request, VerifyResult

STATE_KEY = "pass"
ROWS_PER_DRAFT = {"two_call": 2.0, "fused": 3.0, "branch": 2.5}
"""Rows the step-cost controller charges one PaSS draft not yet made. two_call: the look-ahead row that
drafts it now plus its verify row next step (once drafted, only the verify row is left to pay:
`rows_per_draft`). fused: its verify row and look-ahead row plus, after a rejection (the usual case at
this acceptance), the drafting-only step that refills the pipeline: 2 + (1 - alpha) rows, rounded up.
branch: the same plus that step after an acceptance: 2 + alpha rows, alpha ~0.5 refined (session 25)."""


@dataclass(frozen=True)
class RowPlan:
    """One request's share of a step: drafts verified and look-ahead rows appended."""

    num_draft: int
    num_lookahead: int

    @property
    def num_rows(self) -> int:
        return self.num_draft + self.num_lookahead


class PassProposer:
    """Drafts from the previous step's look-ahead rows; plans this step's look-ahead rows."""

    name = "pass"

    def __init__(self, embeds: torch.Tensor, mode: str = "fused", max_lookahead: int | None = None,
                 refiner: Refiner | None = None):
        if mode not in MODES:
            raise ValueError(f"pass mode must be one of {', '.join(MODES)}, not {mode!r}")
        if embeds.dim() != 2 or embeds.shape[0] < 1:
            raise ValueError(f"look-ahead embeddings must be [L >= 1, hidden], got {tuple(embeds.shape)}")
        self.embeds = embeds  # [L, hidden]
        self.mode = mode
        self.num_lookahead = min(embeds.shape[0], max_lookahead or embeds.shape[0])
        self.refiner = refiner
        """None: the look-ahead rows' own drafts, unrefined."""

    def propose(self, requests: list[Request], max_drafts: dict[str, int]) -> dict[str, DraftTree]:
        """The pending drafts of each request whose text they still continue."""
        return propose_pending(requests, max_drafts, STATE_KEY)

    def offer(self, request: Request, proposal: DraftTree | None, limit: int) -> list[int]:
        """Depths the controller may keep: the pending drafts, or (none pending) the drafts that
        look-ahead rows appended this step would make for the next one."""
        if proposal is not None:
            return list(range(1, len(proposal) + 1))
        return list(range(1, min(self.num_lookahead, limit) + 1))

    def rows_per_draft(self, proposal: DraftTree | None) -> float:
        """What one draft of this offer costs from now on. A two_call validation's look-ahead row was
        paid for in the drafting step: charging it again made the controller refuse validations whose
        drafts it had already paid a row for (the marginal price is the verify row alone)."""
        if self.mode == "two_call" and proposal is not None:
            return 1.0
        return ROWS_PER_DRAFT[self.mode]

    def plan(self, proposal: DraftTree | None, keep: int, limit: int) -> RowPlan:
        """Rows for a request the controller gave `keep` drafts (of `offer`); limit = drafts it could use."""
        if keep <= 0:
            return RowPlan(0, 0)
        if proposal is None:  # a drafting step: look-ahead rows only
            return RowPlan(0, min(keep, limit))
        if self.mode == "two_call":  # a validation step: drafts only
            return RowPlan(keep, 0)
        if self.mode == "branch":  # the rows that draft for the step after an all-rejected one
            return RowPlan(keep, min(self.num_lookahead, limit))
        # Fused: re-draft one deeper than kept, so a short chain grows back as acceptance allows.
        return RowPlan(keep, min(self.num_lookahead, keep + 1, limit))

    def observe_draft_rows(self, request: Request, result: VerifyResult, logits: torch.Tensor | None) -> None:
        """After a step that appended look-ahead rows: their outputs are the next drafts when they
        continue the text the step left: after the drafts, when every draft was accepted; beside
        them (branch), when none was (else they were conditioned on other tokens than the emitted).

        logits: # [num_lookahead, vocab] fp32, the request's look-ahead rows in order.
        Called before the step's tokens are appended to request.token_ids.
        """
        continues = 0 if self.mode == "branch" else result.num_draft  # drafts the rows come after
        valid = logits is not None and logits.shape[0] > 0 and result.num_accepted == continues
        anchor = request.num_tokens + len(result.token_ids)
        if valid and self.refiner is not None:  # a chain: fused mode appends look-ahead rows after it
            self.refiner.redraft(request, pending(request, STATE_KEY), logits, result.token_ids, anchor, num_paths=1)
        else:
            set_pending(request, STATE_KEY, logits if valid else None, anchor)


# ---------------------------------------------------------------- loading


def load_pass_proposer(config, model_dir: Path, refiner: Refiner | None = None) -> PassProposer | None:
    """The drafter for config.pass_artifact (or the committed default for this model; None if there
    is none). Raises ArtifactError (a ValueError) for an artifact of another model or method."""
    from engine.train.artifact import load_served_artifact

    artifact = load_served_artifact(config.pass_artifact, "pass", config.model, model_dir)
    if artifact is None:
        return None
    max_lookahead = min(config.pass_lookahead, config.num_draft_tokens) or 1
    return PassProposer(artifact.tensors["lookahead"].float(), config.pass_mode, max_lookahead, refiner)
