"""`--spec bpd`: Blockwise Parallel Decoding heads.

Stern, Shazeer, Uszkoreit 2018, "Blockwise Parallel Decoding for Deep Autoregressive Models": K
extra heads on the model's last hidden state guess the K tokens after the next one; the model then
verifies the block in one pass and keeps the longest right prefix. Here the heads sit on the frozen
model (trained by engine/train/bpd.py; artifacts/bpd/): head i maps the final-normed hidden state h
of a row to h + SiLU(W_i h + b_i), and the model's own lm_head turns that into logits.

Drafting rides in verification, so it costs no forward of its own: when a BPD request drafts, the
runner applies the heads to each of its sampled rows and computes their logits in the same lm_head
call as the verify rows (`ScheduledRequest.draft_heads`). After verification only the row that
emitted the step's last token matters: its K head rows guess the K tokens after that token, which
are the next step's chain of drafts. Heads read hidden states, not the cache: no KV slots.

Draft refinement (engine/spec/refine.py, Kim et al. 2024) is on by default: the heads' top-k
lattice is rescored by an n-gram LM of the request's own text backed by one of the self-distilled
data, which knows the token being emitted (the heads do not). Without it (`refine_weight` 0)
drafts carry their q exactly as unrefined PaSS drafts do (engine/spec/base.py `set_pending`): greedy requests take
the argmax, sampled ones draw from their own temperature / top-k / top-p applied to the head row.
Either way the verifier's min(1, p/q) test keeps the output distribution exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.spec.base import depths, pending, propose_pending, set_pending
from engine.spec.refine import Refiner
from engine.types import DraftTree, Request, VerifyResult

STATE_KEY = "bpd"
HEAD_ROW_SHARE = 0.21
"""What one head row (a head block and an lm_head row) costs in the step-cost controller's rows until
the engine measures it at start-up (`BpdProposer.head_row_share`): the lm_head's share of the default
model's weights (28M of 135M). Measured on the dev CPU (session 26, two start-ups each): 0.19-0.20 in
fp32, 0.18-0.24 in int8 (whose lm_head rescoring in fp32 had been suspected of raising it). A model
whose vocabulary weighs more, or a GPU, gets its own figure."""
SAMPLED_ROWS_PER_DRAFT = 1.8
"""Each sampled row of a drafting request gets K head rows: a chain of n drafts has n + 1 sampled rows,
(1 + n) / n per draft, 2 / 1.5 for n = 1 / 2. With K = 2 and the fp32 share: 1.76 rows per draft. At
1.25 the controller kept drafts at 8 clients that the head rows made cost more than they gave (0.95x
`none`, fp32, session 21)."""


@dataclass
class DraftHeads:
    """K residual heads on final-normed hidden states: head i's output is h + SiLU(W_i h + b_i)."""

    weight: torch.Tensor  # [K, H, H]
    bias: torch.Tensor  # [K, H]

    def __post_init__(self):
        k, out, inp = self.weight.shape if self.weight.dim() == 3 else (0, 0, -1)
        if k < 1 or out != inp or tuple(self.bias.shape) != (k, out):
            raise ValueError(f"BPD heads must be weight [K, H, H] and bias [K, H], got "
                             f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}")

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def to(self, device, dtype) -> "DraftHeads":
        return DraftHeads(self.weight.to(device, dtype), self.bias.to(device, dtype))

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden # [N, H] -> # [N * K, H]: row n's K head outputs together, head 1 first."""
        return head_outputs(hidden, self.weight, self.bias).reshape(-1, hidden.shape[-1])


def head_outputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """hidden # [N, H], weight # [K, H, H], bias # [K, H] -> # [N, K, H]: h + SiLU(W_i h + b_i).
    Serving and training (engine/train/bpd.py) both go through it."""
    return hidden[:, None, :] + F.silu(torch.einsum("nh,koh->nko", hidden, weight) + bias)


class BpdProposer:
    """Drafts what the heads guessed at the row that emitted the request's last token."""

    name = "bpd"

    def __init__(self, heads: DraftHeads, refiner: Refiner | None = None):
        self.heads = heads
        self.refiner = refiner
        """None: the heads' own drafts, unrefined."""
        self.head_row_share = HEAD_ROW_SHARE
        """One head row's cost in the controller's rows (the engine measures it at start-up)."""

    def rows_per_draft(self, proposal: DraftTree | None) -> float:
        """A draft's verify row and its share of the head rows."""
        return 1.0 + self.heads.num_heads * self.head_row_share * SAMPLED_ROWS_PER_DRAFT

    def propose(self, requests: list[Request], max_drafts: dict[str, int]) -> dict[str, DraftTree]:
        return propose_pending(requests, max_drafts, STATE_KEY)

    def offer(self, request: Request, proposal: DraftTree | None, limit: int) -> list[int]:
        """Depths the controller may keep: the pending drafts, or (none pending) the drafts the
        heads would make this step for the next one."""
        if proposal is not None:
            return depths(proposal)
        return list(range(1, min(self.heads.num_heads, limit) + 1))

    def observe_draft_rows(self, request: Request, result: VerifyResult, logits: torch.Tensor | None) -> None:
        """logits # [K, vocab]: the head rows of the row that emitted the step's last token (None:
        the heads did not run). Called before the step's tokens are appended to request.token_ids."""
        anchor = request.num_tokens + len(result.token_ids)
        if self.refiner is None or logits is None or logits.shape[0] == 0:
            set_pending(request, STATE_KEY, logits, anchor)
        else:
            self.refiner.redraft(request, pending(request, STATE_KEY), logits, result.token_ids, anchor)


def load_bpd_proposer(config, model_dir: Path, refiner: Refiner | None = None) -> BpdProposer | None:
    """The drafter for config.bpd_artifact (or the committed default for this model; None if there
    is none). Raises ArtifactError (a ValueError) for an artifact of another model or method."""
    from engine.train.artifact import load_served_artifact

    artifact = load_served_artifact(config.bpd_artifact, "bpd", config.model, model_dir)
    if artifact is None:
        return None
    num_heads = max(1, config.num_draft_tokens)  # more heads than drafts would be computed for nothing
    weight, bias = artifact.tensors["weight"], artifact.tensors["bias"]
    return BpdProposer(DraftHeads(weight[:num_heads].float(), bias[:num_heads].float()), refiner)
