"""EMS-SD in the engine step: propose -> plan -> (schedule) -> attach -> verify -> commit.

EMS-SD (Ni et al. 2024, "EMS-SD: Efficient Multi-sample Speculative Decoding"): every running
request drafts for itself, the drafts of the whole batch are verified in ONE forward over the
concatenation of each request's [last token + its own drafts] (no padding; a request may have 0
drafts), and each request accepts what it earned. Its K/V stay where the runner wrote them
(slots num_computed .. num_computed + num_drafts); after verification the accepted path is kept
(a tree's path is first copied into consecutive slots) and the rest is simply rolled back.

Rows: the runner returns, per sampling request, 1 + len(draft) logits rows (row 0 = after the last
real token, row i + 1 = after draft node i), concatenated in scheduled order; PaSS look-ahead rows
(engine/spec/lookahead.py) come apart, `num_lookahead` per request, in the same order, and so do
BPD head rows (engine/spec/bpd.py), K per sampled row of each request with `draft_heads`. Recycle
requests (engine/spec/recycle.py) keep the hidden state of the row that emitted their last token and
draft from it after the plan, for the drafts the controller kept. engine/verify_step.py turns the
rows into each request's outcome.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.config import TRAINED_METHODS, EngineConfig
from engine.spec.base import depths
from engine.spec.controller import DraftController
from engine.spec.loading import build_proposers
from engine.types import DraftTree, Request, ScheduledRequest, SchedulerOutput, VerifyResult
from engine.verify_step import Verified


def trim(tree: DraftTree, num_nodes: int) -> DraftTree | None:
    """The first num_nodes nodes (parents precede children, so any prefix is a valid tree)."""
    if num_nodes <= 0 or len(tree) == 0:
        return None
    if num_nodes >= len(tree):
        return tree
    q = tree.draft_probs[:num_nodes] if tree.draft_probs is not None else None
    return DraftTree(tree.token_ids[:num_nodes], tree.parents[:num_nodes], q)


def attach_drafts(sched: SchedulerOutput, proposals: dict[str, DraftTree],
                  lookahead: dict[str, int] | None = None) -> None:
    """Give each scheduled decode its proposal, cut to the slots the scheduler reserved; look-ahead
    rows (PaSS) get the slots the drafts leave."""
    for s in sched.scheduled:
        if s.max_draft_tokens <= 0 or not s.samples:
            continue
        tree = proposals.get(s.request.request_id)
        if tree is not None:
            s.draft = trim(tree, s.max_draft_tokens)
        if lookahead:
            num_used = len(s.draft) if s.draft is not None else 0
            s.num_lookahead = min(lookahead.get(s.request.request_id, 0), s.max_draft_tokens - num_used)


def accepted_path_moves(s: ScheduledRequest, result: VerifyResult) -> tuple[list[int], list[int]]:
    """Cache indices to copy so the accepted path's K/V sit right after the root token.

    Draft node j was written at cache index base + j (base = the root's index + 1); the path's i-th
    node belongs at base + i. A chain's accepted prefix is already in place (no moves).
    """
    base = s.request.num_cache_slots + s.num_new_tokens
    src, dst = [], []
    for i, node in enumerate(result.accepted_nodes):
        if node != i:
            src.append(base + node)
            dst.append(base + i)
    return src, dst


def _decoding(request: Request) -> bool:
    """Its prompt is in the cache and one token (the last sampled) is left to compute."""
    return request.num_tokens - request.num_computed_tokens == 1


class Speculator:
    """The engine's speculation part: the drafters, the draft controller and the per-step plan."""

    def __init__(self, config: EngineConfig, model_dir: Path | None = None):
        self.default_method = config.spec
        self.num_draft_tokens = config.num_draft_tokens
        self.padded = config.spec_layout in ("padded", "padded-kv")
        self.pads_kv = config.spec_layout == "padded-kv"
        self.controller = DraftController(adaptive=config.spec_adaptive, fairness=config.spec_fairness)
        self.proposers = build_proposers(config, model_dir)
        pass_proposer = self.proposers.get("pass")
        self._lookahead_from_root = pass_proposer is not None and pass_proposer.mode == "branch"
        self._proposals: dict[str, DraftTree] = {}
        self._plan: dict[str, int] = {}
        self._lookahead: dict[str, int] = {}  # request_id -> PaSS look-ahead rows this step
        self._heads: set[str] = set()  # requests whose sampled rows get the BPD heads this step
        self.unverified: set[str] = set()  # requests whose drafts are kept without verification (--recycle-lossy)

    @property
    def lookahead_embeds(self) -> torch.Tensor | None:
        """The PaSS embeddings the model runner appends (None without a PaSS drafter)."""
        proposer = self.proposers.get("pass")
        return proposer.embeds if proposer is not None else None

    @property
    def draft_heads(self):
        """The BPD heads the model runner applies (None without a BPD drafter)."""
        proposer = self.proposers.get("bpd")
        return proposer.heads if proposer is not None else None

    @property
    def num_heads(self) -> int:
        heads = self.draft_heads
        return heads.num_heads if heads is not None else 0

    @property
    def wants_hidden(self) -> bool:
        """Whether verify_step must hand out emitting rows' hidden states (a recycle drafter is loaded)."""
        return "recycle" in self.proposers

    def bind_model(self, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        """The served model's dense input embedding and lm_head, for drafters that run its parts (recycle)."""
        for proposer in self.proposers.values():
            if hasattr(proposer, "bind_model"):
                proposer.bind_model(embed, lm_head)

    def method_of(self, request: Request) -> str:
        return request.spec.method or self.default_method

    def check_method(self, method: str | None) -> None:
        if method is not None and method != "none" and method not in self.proposers:
            hint = f" (no {method} artifact is loaded for this model: see --{method}-artifact)" \
                if method in TRAINED_METHODS else ""
            raise ValueError(f"unknown speculative method {method!r}{hint}; choose from none, "
                             f"{', '.join(sorted(self.proposers))}")
        if method in TRAINED_METHODS and self.padded:
            raise ValueError(f"speculative method {method!r} is not available with a padded --spec-layout")

    def max_drafts(self, request: Request, max_model_len: int) -> int:
        """Drafts past max_tokens or the context window could never be emitted."""
        k = request.spec.num_draft_tokens if request.spec.num_draft_tokens is not None else self.num_draft_tokens
        room = min(request.sampling.max_tokens - request.num_output_tokens, max_model_len - request.num_tokens)
        return max(0, min(k, room - 1))

    def prepare(self, running: list[Request], max_model_len: int) -> None:
        """Before scheduling: every decoding request proposes; the controller decides what to keep."""
        by_method: dict[str, list[Request]] = {}
        for r in running:
            method = self.method_of(r)
            if method != "none" and _decoding(r):
                by_method.setdefault(method, []).append(r)
        self._proposals, self._lookahead, self._heads, offers, limits, rows = {}, {}, set(), {}, {}, {}
        self.unverified = set()
        for method, requests in by_method.items():
            proposer = self.proposers[method]
            limits.update({r.request_id: self.max_drafts(r, max_model_len) for r in requests})
            for rid, tree in proposer.propose(requests, limits).items():
                tree = trim(tree, limits[rid])
                if tree is not None:
                    self._proposals[rid] = tree
            for r in requests:
                tree = self._proposals.get(r.request_id)
                offer = (proposer.offer(r, tree, limits[r.request_id]) if hasattr(proposer, "offer")
                         else depths(tree) if tree is not None else [])
                if offer:
                    weights = proposer.node_weights(r, tree) if hasattr(proposer, "node_weights") else None
                    offers[r.request_id] = (r, method, offer, weights)
                    rows[r.request_id] = proposer.rows_per_draft(tree) if hasattr(proposer, "rows_per_draft") else 1.0
        # every decoding request counts, a `none` one too: the plan must stay fair to it (controller.py)
        decoding = [r for r in running if _decoding(r)]
        self._plan = self.controller.plan(offers, len(decoding), rows,
                                          sum(r.num_tokens for r in decoding)) if offers else {}
        for r in by_method.get("pass", []):
            self._plan_lookahead(r, limits[r.request_id], max_model_len)
        for r in by_method.get("bpd", []):
            self._plan_heads(r)
        if by_method.get("recycle"):
            self._draft_recycle(by_method["recycle"], limits)
        if self.padded and self._plan:  # the vanilla baseline: every request padded to the longest
            longest = max(self._plan.values())
            self._plan = {r.request_id: longest for reqs in by_method.values() for r in reqs
                          if self.max_drafts(r, max_model_len) >= longest}

    def _plan_lookahead(self, r: Request, limit: int, max_model_len: int) -> None:
        """Turn the controller's count for a PaSS request into drafts + look-ahead rows."""
        rid = r.request_id
        tree = self._proposals.get(rid)
        rows = self.proposers["pass"].plan(tree, self._plan.get(rid, 0), limit)
        # Look-ahead rows take positions too: never past the context window.
        num_lookahead = max(0, min(rows.num_lookahead, max_model_len - r.num_tokens - rows.num_draft))
        tree = trim(tree, rows.num_draft) if tree is not None else None
        if tree is None:
            self._proposals.pop(rid, None)
        else:
            self._proposals[rid] = tree
        self._lookahead[rid] = num_lookahead
        self._plan[rid] = rows.num_draft + num_lookahead

    def _plan_heads(self, r: Request) -> None:
        """A BPD request the controller kept anything for runs the heads this step (they draft the
        next one); without pending drafts what it kept were those future drafts: no slots now."""
        rid = r.request_id
        if self._plan.get(rid, 0) > 0:
            self._heads.add(rid)
            if rid not in self._proposals:
                self._plan[rid] = 0

    def _draft_recycle(self, requests: list[Request], limits: dict[str, int]) -> None:
        """Draft what the controller kept for recycle requests, all in one batch of module rounds; with
        --recycle-lossy every ready request instead takes one draft, unverified (alternating decoding)."""
        proposer = self.proposers["recycle"]
        if proposer.lossy:
            for r in requests:
                if proposer.ready(r) and limits[r.request_id] >= 1:
                    self._plan[r.request_id] = 1
                    self.unverified.add(r.request_id)
        drafting = [r for r in requests if self._plan.get(r.request_id, 0) > 0]
        self._proposals.update(proposer.draft(drafting, [self._plan[r.request_id] for r in drafting]))

    def draft_policy(self, request: Request) -> int:
        """The scheduler's hook: drafts this request may verify this step."""
        return self._plan.get(request.request_id, 0)

    def attach(self, sched: SchedulerOutput) -> dict[str, int]:
        """Attach drafts; in the padded layout fill every draft up to its reservation with filler
        nodes. Returns request_id -> real draft length for `unpad`."""
        attach_drafts(sched, self._proposals, self._lookahead)
        for s in sched.scheduled:
            s.draft_heads = s.samples and s.request.request_id in self._heads
            s.lookahead_from_root = self._lookahead_from_root and s.num_lookahead > 0
        real = {s.request.request_id: len(s.draft) if s.draft is not None else 0 for s in sched.scheduled}
        if self.padded:
            for s in sched.scheduled:
                if s.samples and s.max_draft_tokens > real[s.request.request_id]:
                    s.draft = pad_chain(s.draft, s.max_draft_tokens)
        return real

    def kv_padding(self, entries: list[ScheduledRequest], verified: list[Verified]) -> dict[str, int]:
        """padded-kv, EMS-SD's vanilla baseline: a rectangular cache grows every padded request by the
        batch's best acceptance, so each keeps (best - own accepted) of its rejected slots as padding.
        Returns request_id -> padding slots (empty in the other layouts)."""
        if not self.pads_kv:
            return {}
        padded = [(s, v) for s, v in zip(entries, verified) if s.max_draft_tokens > 0]
        best = max((v.result.num_accepted for _, v in padded), default=0)
        return {s.request.request_id: best - v.result.num_accepted for s, v in padded}

    def top_k_for(self, entries: list[ScheduledRequest]) -> dict[str, int]:
        """request_id -> leading tokens per row its proposer learns from, for requests verifying a draft
        (a step without one teaches the Jacobi window nothing: engine/spec/jacobi.py observe)."""
        needs = {}
        for s in entries:
            if s.draft is None:
                continue
            proposer = self.proposers.get(self.method_of(s.request))
            if proposer is not None and hasattr(proposer, "observe"):
                needs[s.request.request_id] = proposer.top_k_needed
        return needs

    def observe(self, s: ScheduledRequest, verified: Verified) -> None:
        method = self.method_of(s.request)
        proposer = self.proposers.get(method)
        if proposer is not None and hasattr(proposer, "observe") and verified.row_top_tokens is not None:
            proposer.observe(s.request, verified.result, verified.row_top_tokens)
        if verified.draft_rows is not None and hasattr(proposer, "observe_draft_rows"):
            proposer.observe_draft_rows(s.request, verified.result, verified.draft_rows)
        if verified.emitted_hidden is not None and hasattr(proposer, "observe_emitted"):
            proposer.observe_emitted(s.request, verified.result, verified.emitted_hidden)
        draft_depth = max(depths(s.draft)) if s.draft is not None else 0
        self.controller.record(s.request, method, draft_depth, verified.result.num_accepted)


def pad_chain(tree: DraftTree | None, length: int) -> DraftTree:
    """Extend with filler nodes (computed, then discarded by `unpad`): the padded baseline's waste."""
    tokens = list(tree.token_ids) if tree is not None else []
    parents = list(tree.parents) if tree is not None else []
    while len(tokens) < length:
        parents.append(len(tokens) - 1)
        tokens.append(0)
    return DraftTree(tokens, parents)


def unpad(logits: torch.Tensor, entries: list[ScheduledRequest], real: dict[str, int]) -> torch.Tensor:
    """Drop the filler rows of the padded layout and restore each request's real draft."""
    keep, row = [], 0
    for s in entries:
        num_real = real[s.request.request_id]
        size = 1 + (len(s.draft) if s.draft is not None else 0)
        keep += range(row, row + 1 + num_real)
        row += size
        s.draft = trim(s.draft, num_real) if s.draft is not None else None
    return logits[keep] if len(keep) != logits.shape[0] else logits
