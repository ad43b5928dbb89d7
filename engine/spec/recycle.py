"""`--spec recycle`: RecycleGPT's recyclable module.

Jiang et al. 2023, "RecycleGPT: An Autoregressive Language Model with Recyclable Module": the model's
last hidden state h_t (the row that produced token x_{t+1}) together with the embedding of x_{t+1}
already says a lot about x_{t+2}, so a small module that reads both guesses the next token without
running the whole model; its output hidden state and its own guess feed it again for the token after.

Here the module sits on the frozen model (trained by engine/train/recycle.py; artifacts/recycle/):
  z = W_in [h ; rmsnorm(e)] + b_in,   g = z + W_2 SiLU(W_1 z + b_1),   draft logits = lm_head(g)
with h the final-normed hidden state and e the token's input embedding. The paper's module is a stack
of transformer layers trained with the model; this one is a single residual MLP without attention
(h already carries the context), so it needs no cache of its own: the only per-request state is the
hidden state of the row that emitted the request's last token, which every verify step computes anyway.

Drafting runs after the controller's plan, for the drafts it kept only, batched over the step's
recycle requests: round d applies the module to all of them at once. A round's cost is the lm_head
over the draft vocabulary (the artifact's `vocab`: the tokens the model emits most, a fraction of the
full vocabulary; the verifier scores every draft against the full one, so the output is exact whatever
the draft vocabulary misses). Sampled requests draw each draft from q = their own temperature / top-k
/ top-p over the draft vocabulary and pass q to the verifier (min(1, p/q), lossless).

By default drafts are verified (lossless). `--recycle-lossy` is the paper's alternating decoding: the
module's first draft is kept without verification, so each step emits a module token and a model token;
the output is no longer the model's own (measured against `none` in benchmarks/results/recycle_cpu.txt).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.sampler import get_generator, probs_from_logits, sample_from_probs
from engine.spec.base import chain
from engine.types import DraftTree, Request, VerifyResult

STATE_KEY = "recycle"
ROWS_PER_DRAFT = 5.0
"""Rows the step-cost controller charges one recycle draft: its verify row plus its share of a module
round, which reads the module and the draft vocabulary's lm_head rows once for all the step's recycle
requests (the controller has no per-round fixed cost to charge instead). Measured (session 22, default
model, 2-core guest): a round takes 1.06 ms for one request and 2.77 ms for eight, against plain decode
steps of 23.5 / 32.5 ms in fp32 and 11.2 / 16.8 ms in int8. Verifying every draft, a draft cost 0.11
of a batch-1 step in fp32 and 0.19 in int8, ~3 and ~5 of the controller's calibrated rows. At batch 1
(benchmarks/results/recycle_cpu.txt): charged 2 rows, 0.96x `none` in fp32; 3 rows, 1.00x in fp32 and
0.96x in int8 (the CPU default); 5 rows, 1.00x in fp32 and 0.98x in int8."""


@dataclass
class RecycleModule:
    """The module's weights (names as in the artifact) plus the draft vocabulary."""

    w_in: torch.Tensor  # [H, 2H]
    b_in: torch.Tensor  # [H]
    w_1: torch.Tensor  # [F, H]
    b_1: torch.Tensor  # [F]
    w_2: torch.Tensor  # [H, F]
    vocab: torch.Tensor  # [V'] int64 draft vocabulary (token ids), most frequent first

    TENSORS = ("w_in", "b_in", "w_1", "b_1", "w_2")

    def __post_init__(self):
        hidden = self.w_in.shape[0]
        ok = (self.w_in.shape == (hidden, 2 * hidden) and self.b_in.shape == (hidden,)
              and self.w_1.dim() == 2 and self.w_1.shape[1] == hidden and self.b_1.shape == self.w_1.shape[:1]
              and self.w_2.shape == (hidden, self.w_1.shape[0]) and self.vocab.dim() == 1 and len(self.vocab) > 0)
        if not ok:
            raise ValueError("a recycle module needs w_in [H, 2H], b_in [H], w_1 [F, H], b_1 [F], w_2 [H, F] "
                             f"and a non-empty vocab, got {[tuple(t.shape) for t in self.params()]}, "
                             f"vocab {tuple(self.vocab.shape)}")

    @property
    def hidden_size(self) -> int:
        return self.w_in.shape[0]

    def params(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.TENSORS]

    def to(self, device, dtype) -> "RecycleModule":
        return RecycleModule(*(t.to(device, dtype) for t in self.params()), self.vocab.to(device))


def recycle(hidden: torch.Tensor, embeds: torch.Tensor, w_in, b_in, w_1, b_1, w_2) -> torch.Tensor:
    """hidden # [N, H] final-normed, embeds # [N, H] the next tokens' input embeddings -> # [N, H]:
    the hidden state whose logits guess the token after them. Serving and training
    (engine/train/recycle.py) both go through it."""
    x = torch.cat([hidden, F.rms_norm(embeds, (embeds.shape[-1],))], dim=-1)
    z = F.linear(x, w_in, b_in)
    return z + F.linear(F.silu(F.linear(z, w_1, b_1)), w_2)


@dataclass
class RecycleState:
    hidden: torch.Tensor | None = None  # [H] the row that emitted the request's last token
    anchor: int = -1  # len(request.token_ids) when that token was the last: any other length is stale


def _state(request: Request) -> RecycleState:
    state = request.state.get(STATE_KEY)
    if state is None:
        state = request.state[STATE_KEY] = RecycleState()
    return state


class RecycleProposer:
    """Drafts, after the controller's plan, from each request's last emitting row and last token."""

    name = "recycle"

    def __init__(self, module: RecycleModule, max_depth: int, lossy: bool = False):
        self.module = module
        self.max_depth = max(1, max_depth)
        self.lossy = lossy
        self.embed: torch.Tensor | None = None  # [vocab, H] the model's input embeddings (bind_model)
        self.head: torch.Tensor | None = None  # [V', H] the lm_head rows of the draft vocabulary
        self.index_of: torch.Tensor | None = None  # [vocab] a token's index in the draft vocabulary

    def rows_per_draft(self, proposal: DraftTree | None) -> float:
        return ROWS_PER_DRAFT

    def bind_model(self, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        """The served model's dense input embedding and lm_head ([vocab, H] each)."""
        if embed.shape[1] != self.module.hidden_size:
            raise ValueError(f"the recycle module is for hidden size {self.module.hidden_size}, the model's "
                             f"is {embed.shape[1]}")
        if int(self.module.vocab.max()) >= lm_head.shape[0]:
            raise ValueError("the recycle module's draft vocabulary is larger than the model's")
        self.module = self.module.to(embed.device, embed.dtype)
        self.embed, self.head = embed, lm_head[self.module.vocab].contiguous()
        vocab = self.module.vocab
        self.index_of = torch.zeros(embed.shape[0], dtype=torch.long, device=vocab.device)
        self.index_of[vocab] = torch.arange(len(vocab), device=vocab.device)

    def propose(self, requests: list[Request], max_drafts: dict[str, int]) -> dict[str, DraftTree]:
        """Nothing yet: drafting waits for the plan (`draft`), so only kept drafts cost a round."""
        return {}

    def offer(self, request: Request, proposal: DraftTree | None, limit: int) -> list[int]:
        """Depths the controller may keep: up to max_depth once the request has an emitting row (none
        when lossy: then every ready request takes one draft, outside the controller's plan)."""
        if self.lossy or not self.ready(request):
            return []
        return list(range(1, min(self.max_depth, limit) + 1))

    def ready(self, request: Request) -> bool:
        state = request.state.get(STATE_KEY)
        return state is not None and state.anchor == request.num_tokens

    @torch.inference_mode()
    def draft(self, requests: list[Request], depths: list[int]) -> dict[str, DraftTree]:
        """Chains of depths[i] drafts for requests[i] (each ready, depth >= 1), one module round per depth."""
        if not requests:
            return {}
        hidden = torch.stack([_state(r).hidden for r in requests])
        tokens = torch.tensor([r.token_ids[-1] for r in requests], device=hidden.device)
        drafts: list[list[int]] = [[] for _ in requests]
        q_rows: list[list[torch.Tensor]] = [[] for _ in requests]
        params = self.module.params()
        for depth in range(max(depths)):
            hidden = recycle(hidden, self.embed[tokens], *params)
            logits = F.linear(hidden, self.head).float()  # [N, V']
            picks = self._pick(requests, logits, q_rows)
            tokens = self.module.vocab[picks]
            for i, token in enumerate(tokens.tolist()):
                if depth < depths[i]:
                    drafts[i].append(token)
        return {r.request_id: chain(d, torch.stack(q[:len(d)]) if q else None)  # q of its own rounds only
                for r, d, q in zip(requests, drafts, q_rows)}

    def _pick(self, requests: list[Request], logits: torch.Tensor, q_rows: list[list[torch.Tensor]]) -> torch.Tensor:
        """Per request: the argmax (greedy), or a draw from q over the draft vocabulary, whose full-vocabulary
        row is kept for the verifier. Returns indices into the draft vocabulary."""
        picks = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(requests) if not r.sampling.greedy]
        if sampled:
            full = logits.new_full((len(sampled), self.embed.shape[0]), float("-inf"))
            full[:, self.module.vocab] = logits[sampled]
            q = probs_from_logits(full, [requests[i].sampling for i in sampled])
            tokens = sample_from_probs(q, [get_generator(requests[i]) for i in sampled])
            picks[sampled] = self.index_of[tokens.to(picks.device)]
            for row, i in enumerate(sampled):
                q_rows[i].append(q[row])
        return picks

    def observe_emitted(self, request: Request, result: VerifyResult, hidden: torch.Tensor) -> None:
        """hidden # [H]: the final-normed hidden state of the row that emitted the step's last token.
        Called before the step's tokens are appended to request.token_ids."""
        state = _state(request)
        # A copy: the row must outlive its step's output (a request not scheduled next step drafts later).
        state.hidden, state.anchor = hidden.clone(), request.num_tokens + len(result.token_ids)


def load_recycle_proposer(config, model_dir: Path) -> RecycleProposer | None:
    """The drafter for config.recycle_artifact (or the committed default for this model; None if there is
    none). Raises ArtifactError (a ValueError) for an artifact of another model or method."""
    from engine.train.artifact import load_served_artifact

    artifact = load_served_artifact(config.recycle_artifact, "recycle", config.model, model_dir)
    if artifact is None:
        return None
    tensors = artifact.tensors
    module = RecycleModule(*(tensors[name].float() for name in RecycleModule.TENSORS), tensors["vocab"].long())
    # Rounds past the ones it was trained unrolled for would feed it outputs it never learned from.
    max_depth = min(config.num_draft_tokens, int(artifact.header.get("depth", config.num_draft_tokens)))
    return RecycleProposer(module, max_depth, config.recycle_lossy)
