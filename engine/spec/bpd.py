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
data, which knows the token being emitted (the heads do not). Without it (`bpd_refine_weight` 0)
drafts carry their q exactly as PaSS's do (engine/spec/base.py `set_pending`): greedy requests take
the argmax, sampled ones draw from their own temperature / top-k / top-p applied to the head row.
Either way the verifier's min(1, p/q) test keeps the output distribution exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.sampler import get_generator, probs_from_logits
from engine.spec.base import depths, pending, propose_pending, set_pending
from engine.spec.refine import ORDER, NgramLM, RefineConfig, best_paths, global_lm, sample_path, trie
from engine.types import DraftTree, Request, VerifyResult

STATE_KEY = "bpd"
LM_STATE_KEY = "bpd_lm"
ROWS_PER_DRAFT = 1.75
"""Rows the step-cost controller charges one BPD draft: its verify row, plus its share of the head
rows. Each sampled row of a drafting request gets K = 2 head rows through the lm_head, and an
lm_head row costs ~0.21 of a full row (the lm_head holds 28M of the default model's 135M weights):
1 + 0.42 x (1 + n) / n = 1.84 / 1.63 rows per draft for chains of n = 1 / 2. With 1.25 the
controller kept drafts at 8 clients that the head rows made cost more than they gave (0.95x
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
    rows_per_draft = ROWS_PER_DRAFT

    def __init__(self, heads: DraftHeads, refine: RefineConfig | None = None, lm: NgramLM | None = None):
        self.heads = heads
        self.refine = refine
        """None or weight 0: the heads' own drafts, unrefined."""
        self.global_lm = lm
        """The n-gram LM of the self-distilled data each request's own LM backs off to (None: uniform)."""

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
        if self.refine is None or not self.refine.weight or logits is None or logits.shape[0] == 0:
            set_pending(request, STATE_KEY, logits, anchor)
            return
        lm = request.state.get(LM_STATE_KEY)
        if lm is None:
            lm = request.state[LM_STATE_KEY] = NgramLM(logits.shape[-1], base=self.global_lm)
        lm.extend(request.token_ids)  # this step's tokens are counted next step, but condition now:
        context = request.token_ids[-(ORDER - 1):] + result.token_ids
        state = pending(request, STATE_KEY)
        state.q, state.parents, state.anchor = None, None, anchor
        if request.sampling.greedy:
            top = logits.float().topk(self.refine.top_k, dim=-1)  # best_paths: no log-softmax needed
            paths = best_paths(top.values, top.indices, lm, context, self.refine.weight, self.refine.num_paths)
            state.drafts, parents = trie(paths)
            state.parents = None if len(paths) == 1 else parents
        else:
            probs = probs_from_logits(logits.float(), [request.sampling] * logits.shape[0])
            state.drafts, state.q = sample_path(probs, lm, context, self.refine.weight, self.refine.top_k,
                                                get_generator(request))


def load_bpd_proposer(config, model_dir: Path) -> BpdProposer | None:
    """The drafter for config.bpd_artifact (or the committed default for this model; None if there
    is none). Raises ArtifactError (a ValueError) for an artifact of another model or method."""
    from engine.train.artifact import load_served_artifact

    artifact = load_served_artifact(config.bpd_artifact, "bpd", config.model, model_dir)
    if artifact is None:
        return None
    num_heads = max(1, config.num_draft_tokens)  # more heads than drafts would be computed for nothing
    weight, bias = artifact.tensors["weight"], artifact.tensors["bias"]
    heads = DraftHeads(weight[:num_heads].float(), bias[:num_heads].float())
    if not config.bpd_refine_weight:
        return BpdProposer(heads)
    refine = RefineConfig(weight=config.bpd_refine_weight, num_paths=config.bpd_refine_paths)
    return BpdProposer(heads, refine, _data_lm(config))


def _data_lm(config) -> NgramLM | None:
    """The global n-gram LM of config.bpd_ngram_data, or of the committed self-distilled data for this
    model when there is some ("" or no file: None, each request's own text alone). Raises ValueError
    for a named file that is missing or was made by another model."""
    from engine.config import ModelConfig
    from engine.models.loader import model_name
    from engine.train.artifact import ARTIFACTS_DIR
    from engine.train.job import load_training_data

    path = config.bpd_ngram_data
    if path is None:
        path = ARTIFACTS_DIR / "pass" / f"{model_name(config.model)}.data.jsonl"
        if not path.is_file():
            return None
    if not path:
        return None
    if not Path(path).is_file():
        raise ValueError(f"--bpd-ngram-data {path} does not exist (give self-distilled records from "
                         f"`specd train data`, or \"\" for each request's own text alone)")
    data = load_training_data(config.model, path, eval_fraction=0.0)  # refuses another model's data
    return global_lm(ModelConfig.from_hf_dir(data.model_dir).vocab_size, [r.token_ids for r in data.records])
