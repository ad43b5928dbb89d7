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
draft from it after the plan, for the drafts the controller kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import TRAINED_METHODS, EngineConfig
from engine.sampler import apply_logit_processors, compute_logprobs, get_generator, probs_from_logits
from engine.spec.base import depths, path_to
from engine.spec.controller import DraftController
from engine.spec.loading import build_proposers
from engine.types import DraftTree, Request, ScheduledRequest, SchedulerOutput, TokenLogprob, VerifyResult
from engine.verifier import emitted_rows, verify


@dataclass
class Verified:
    """One request's outcome of a verify step."""

    result: VerifyResult
    logprobs: list[TokenLogprob | None]
    row_top_tokens: list[list[int]] | None = None  # for drafters that learn from the target (Jacobi)
    draft_rows: Any = None  # [rows, vocab] logits that draft the next step: this request's PaSS
    # look-ahead rows, or the BPD head rows of the row that emitted its last token (observe_draft_rows)
    emitted_hidden: Any = None  # [hidden] the final-normed hidden state of the row that emitted its last
    # token (observe_emitted: recycle)


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


def _row_histories(request: Request, tree: DraftTree | None) -> list[list[int]]:
    """Output tokens each row was conditioned on (penalties count drafts on the path as output).

    Only penalties read them, so requests without penalties skip copying their output every step.
    """
    num_rows = 1 + (len(tree) if tree is not None else 0)
    if not (request.sampling.presence_penalty or request.sampling.frequency_penalty):
        return [[]] * num_rows
    output = request.output_token_ids
    if tree is None:
        return [output]
    return [output] + [output + [tree.token_ids[k] for k in path_to(tree, node)] for node in range(len(tree))]


def verify_step(logits: torch.Tensor, entries: list[ScheduledRequest], top_k_for: dict[str, int],
                lookahead_logits: torch.Tensor | None = None, head_logits: torch.Tensor | None = None,
                num_heads: int = 0, hidden_states: torch.Tensor | None = None,
                unverified: frozenset[str] | set[str] = frozenset()) -> list[Verified]:
    """Verify every sampling request of the step. logits: # [sum(1 + len(draft)), vocab] fp32;
    lookahead_logits: # [sum(num_lookahead), vocab], handed to each request's Verified.draft_rows; head_logits:
    # [num_heads x the sample rows of requests with draft_heads, vocab], of which each such request's
    Verified gets the num_heads rows of the row that emitted its last token; hidden_states: # [rows like
    logits, hidden], of which each request's Verified gets its emitting row's; unverified: requests
    whose drafts (chains) are kept without verification (--recycle-lossy)."""
    requests = [s.request for s in entries]
    trees = [s.draft for s in entries]
    sizes = [1 + (len(t) if t is not None else 0) for t in trees]
    cu_rows = [0]
    for size in sizes:
        cu_rows.append(cu_rows[-1] + size)
    rows_params = [r.sampling for r, size in zip(requests, sizes) for _ in range(size)]
    histories = [h for r, t in zip(requests, trees) for h in _row_histories(r, t)]
    processed = apply_logit_processors(logits, rows_params, histories)
    if unverified:
        processed = _force_drafts(processed, entries, cu_rows, unverified)
    greedy = [r.sampling.greedy for r in requests]
    target_tokens = processed.argmax(dim=-1) if any(greedy) else None
    probs = None if all(greedy) else probs_from_logits(processed, rows_params)
    generators = [None if g else get_generator(r) for r, g in zip(requests, greedy)]
    results = verify([r.request_id for r in requests], trees, cu_rows, greedy, target_tokens, probs, generators)
    top_k = [top_k_for.get(r.request_id, 0) for r in requests]
    top_rows, top_first = _top_rows(logits, cu_rows, top_k)
    verified = [_verified(logits, r, res, cu_rows[i], top_k[i], top_rows, top_first[i])
                for i, (r, res) in enumerate(zip(requests, results))]
    if lookahead_logits is not None:
        start = 0
        for s, v in zip(entries, verified):
            if s.num_lookahead:
                v.draft_rows = lookahead_logits[start:start + s.num_lookahead]
                start += s.num_lookahead
    if head_logits is not None:
        start = 0
        for s, v, size in zip(entries, verified, sizes):
            if s.draft_heads:
                row = start + emitted_rows(v.result)[-1] * num_heads
                v.draft_rows = head_logits[row:row + num_heads]
                start += size * num_heads
    if hidden_states is not None:
        for first_row, v in zip(cu_rows, verified):
            v.emitted_hidden = hidden_states[first_row + emitted_rows(v.result)[-1]]
    return verified


def _force_drafts(processed: torch.Tensor, entries: list[ScheduledRequest], cu_rows: list[int],
                  unverified: frozenset[str] | set[str]) -> torch.Tensor:
    """A copy of the processed rows in which each unverified request's chain rows allow only its next
    draft token, so greedy and stochastic acceptance both keep every draft (and the bonus row is the
    model's own)."""
    processed = processed.clone()
    for s, first_row in zip(entries, cu_rows):
        if s.request.request_id in unverified and s.draft is not None:
            for k, token in enumerate(s.draft.token_ids):
                processed[first_row + k] = float("-inf")
                processed[first_row + k, token] = 0.0
    return processed


def _top_rows(logits: torch.Tensor, cu_rows: list[int], top_k: list[int]) -> tuple[torch.Tensor | None, list[int]]:
    """The leading max(top_k) token ids of the rows of the requests that ask for them (top_k > 0), and
    where each request's rows start in that tensor. One top-k over those rows, not one per request:
    ~0.7 ms less per 16-request step (2-core Intel guest). Not over the step's every row either: at 16
    clients few requests draft, and a top-k over all 16+ rows took ~0.6 ms a step (AMD guest, profiled)."""
    if not any(top_k):
        return None, [0] * len(top_k)
    firsts, wanted, start = [], [], 0
    for k, lo, hi in zip(top_k, cu_rows, cu_rows[1:]):
        firsts.append(start)
        if k:
            wanted.append(torch.arange(lo, hi))
            start += hi - lo
    rows = logits if start == logits.shape[0] else logits[torch.cat(wanted).to(logits.device)]
    return rows.topk(max(top_k), dim=-1).indices, firsts


def _verified(logits: torch.Tensor, request: Request, result: VerifyResult, first_row: int, top_k: int,
              top_rows: torch.Tensor | None, top_first: int = 0) -> Verified:
    """top_rows # [rows, >= top_k]: leading token ids, best first, of the rows that asked for them, this
    request's from top_first on (None: nobody needs them)."""
    logprobs: list[TokenLogprob | None] = [None] * len(result.token_ids)
    if request.sampling.logprobs is not None:
        rows = [first_row + r for r in emitted_rows(result)]
        logprobs = compute_logprobs(logits[rows], [request.sampling] * len(rows), result.token_ids)
    top = None
    if top_k > 0:
        num_rows = 1 + result.num_draft
        top = top_rows[top_first:top_first + num_rows, :top_k].tolist()
    return Verified(result, logprobs, top)


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
