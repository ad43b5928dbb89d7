"""EMS-SD in the engine step: propose -> plan -> (schedule) -> attach -> verify -> commit.

EMS-SD (Ni et al. 2024, "EMS-SD: Efficient Multi-sample Speculative Decoding"): every running
request drafts for itself, the drafts of the whole batch are verified in ONE forward over the
concatenation of each request's [last token + its own drafts] (no padding; a request may have 0
drafts), and each request accepts what it earned. Its K/V stay where the runner wrote them
(slots num_computed .. num_computed + num_drafts); after verification the accepted path is kept
(a tree's path is first copied into consecutive slots) and the rest is simply rolled back.

Rows: the runner returns, per sampling request, 1 + len(draft) logits rows (row 0 = after the last
real token, row i + 1 = after draft node i), concatenated in scheduled order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.sampler import apply_logit_processors, compute_logprobs, get_generator, probs_from_logits
from engine.spec.base import depths, path_to
from engine.spec.controller import DraftController
from engine.spec.ngram import NgramProposer
from engine.types import DraftTree, Request, ScheduledRequest, SchedulerOutput, TokenLogprob, VerifyResult
from engine.verifier import emitted_rows, verify

DEFAULT_JACOBI_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "spec" / "jacobi.yaml"


@dataclass
class Verified:
    """One request's outcome of a verify step."""

    result: VerifyResult
    logprobs: list[TokenLogprob | None]
    row_top_tokens: list[list[int]] | None = None  # for drafters that learn from the target (Jacobi)


def trim(tree: DraftTree, num_nodes: int) -> DraftTree | None:
    """The first num_nodes nodes (parents precede children, so any prefix is a valid tree)."""
    if num_nodes <= 0 or len(tree) == 0:
        return None
    if num_nodes >= len(tree):
        return tree
    q = tree.draft_probs[:num_nodes] if tree.draft_probs is not None else None
    return DraftTree(tree.token_ids[:num_nodes], tree.parents[:num_nodes], q)


def attach_drafts(sched: SchedulerOutput, proposals: dict[str, DraftTree]) -> None:
    """Give each scheduled decode its proposal, cut to the slots the scheduler reserved."""
    for s in sched.scheduled:
        tree = proposals.get(s.request.request_id)
        if tree is not None and s.max_draft_tokens > 0 and s.samples:
            s.draft = trim(tree, s.max_draft_tokens)


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


def verify_step(logits: torch.Tensor, entries: list[ScheduledRequest], top_k_for: dict[str, int]) -> list[Verified]:
    """Verify every sampling request of the step. logits: # [sum(1 + len(draft)), vocab] fp32."""
    requests = [s.request for s in entries]
    trees = [s.draft for s in entries]
    sizes = [1 + (len(t) if t is not None else 0) for t in trees]
    cu_rows = [0]
    for size in sizes:
        cu_rows.append(cu_rows[-1] + size)
    rows_params = [r.sampling for r, size in zip(requests, sizes) for _ in range(size)]
    histories = [h for r, t in zip(requests, trees) for h in _row_histories(r, t)]
    processed = apply_logit_processors(logits, rows_params, histories)
    greedy = [r.sampling.greedy for r in requests]
    target_tokens = processed.argmax(dim=-1) if any(greedy) else None
    probs = None if all(greedy) else probs_from_logits(processed, rows_params)
    generators = [None if g else get_generator(r) for r, g in zip(requests, greedy)]
    results = verify([r.request_id for r in requests], trees, cu_rows, greedy, target_tokens, probs, generators)
    return [_verified(logits, r, res, cu_rows[i], top_k_for.get(r.request_id, 0))
            for i, (r, res) in enumerate(zip(requests, results))]


def _verified(logits: torch.Tensor, request: Request, result: VerifyResult, first_row: int, top_k: int) -> Verified:
    logprobs: list[TokenLogprob | None] = [None] * len(result.token_ids)
    if request.sampling.logprobs is not None:
        rows = [first_row + r for r in emitted_rows(result)]
        logprobs = compute_logprobs(logits[rows], [request.sampling] * len(rows), result.token_ids)
    top = None
    if top_k > 0:
        num_rows = 1 + result.num_draft
        top = logits[first_row:first_row + num_rows].topk(top_k, dim=-1).indices.tolist()
    return Verified(result, logprobs, top)


def accepted_path_moves(s: ScheduledRequest, result: VerifyResult) -> tuple[list[int], list[int]]:
    """Cache indices to copy so the accepted path's K/V sit right after the root token.

    Draft node j was written at cache index base + j (base = the root's index + 1); the path's i-th
    node belongs at base + i. A chain's accepted prefix is already in place (no moves).
    """
    base = s.request.num_computed_tokens + s.num_new_tokens
    src, dst = [], []
    for i, node in enumerate(result.accepted_nodes):
        if node != i:
            src.append(base + node)
            dst.append(base + i)
    return src, dst


class Speculator:
    """The engine's speculation part: the drafters, the draft controller and the per-step plan."""

    def __init__(self, config: EngineConfig):
        self.default_method = config.spec
        self.num_draft_tokens = config.num_draft_tokens
        self.padded = config.spec_layout == "padded"
        self.controller = DraftController(adaptive=config.spec_adaptive)
        self.proposers = {"ngram": NgramProposer(config.num_draft_tokens)}
        self.proposers.update(_optional_proposers(config))
        self._proposals: dict[str, DraftTree] = {}
        self._plan: dict[str, int] = {}

    def method_of(self, request: Request) -> str:
        return request.spec.method or self.default_method

    def check_method(self, method: str | None) -> None:
        if method is not None and method != "none" and method not in self.proposers:
            raise ValueError(f"unknown speculative method {method!r}; choose from none, "
                             f"{', '.join(sorted(self.proposers))}")

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
            if method != "none" and r.num_tokens - r.num_computed_tokens == 1:
                by_method.setdefault(method, []).append(r)
        self._proposals, offers = {}, {}
        for method, requests in by_method.items():
            limits = {r.request_id: self.max_drafts(r, max_model_len) for r in requests}
            for rid, tree in self.proposers[method].propose(requests, limits).items():
                tree = trim(tree, limits[rid])
                if tree is not None:
                    self._proposals[rid] = tree
            offers.update({r.request_id: (r, method, depths(self._proposals[r.request_id]))
                           for r in requests if r.request_id in self._proposals})
        num_decoding = sum(len(v) for v in by_method.values())
        self._plan = self.controller.plan(offers, num_decoding) if offers else {}
        if self.padded and self._plan:  # the vanilla baseline: every request padded to the longest
            longest = max(self._plan.values())
            self._plan = {r.request_id: longest for reqs in by_method.values() for r in reqs
                          if self.max_drafts(r, max_model_len) >= longest}

    def draft_policy(self, request: Request) -> int:
        """The scheduler's hook: drafts this request may verify this step."""
        return self._plan.get(request.request_id, 0)

    def attach(self, sched: SchedulerOutput) -> dict[str, int]:
        """Attach drafts; in the padded layout fill every draft up to its reservation with filler
        nodes. Returns request_id -> real draft length for `unpad`."""
        attach_drafts(sched, self._proposals)
        real = {s.request.request_id: len(s.draft) if s.draft is not None else 0 for s in sched.scheduled}
        if self.padded:
            for s in sched.scheduled:
                if s.samples and s.max_draft_tokens > real[s.request.request_id]:
                    s.draft = pad_chain(s.draft, s.max_draft_tokens)
        return real

    def top_k_for(self, entries: list[ScheduledRequest]) -> dict[str, int]:
        needs = {}
        for s in entries:
            proposer = self.proposers.get(self.method_of(s.request))
            if proposer is not None and hasattr(proposer, "observe"):
                needs[s.request.request_id] = proposer.top_k_needed
        return needs

    def observe(self, s: ScheduledRequest, verified: Verified) -> None:
        method = self.method_of(s.request)
        proposer = self.proposers.get(method)
        if proposer is not None and hasattr(proposer, "observe") and verified.row_top_tokens is not None:
            proposer.observe(s.request, verified.result, verified.row_top_tokens)
        self.controller.record(s.request, method, verified.result.num_draft, verified.result.num_accepted)


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


def _optional_proposers(config: EngineConfig) -> dict:
    try:
        from engine.spec.jacobi import JacobiConfig, JacobiProposer
    except ImportError:  # the Jacobi drafter is not built yet
        return {}
    path = Path(config.jacobi_config) if config.jacobi_config else DEFAULT_JACOBI_CONFIG
    jacobi = JacobiConfig.from_yaml(path) if path.is_file() else JacobiConfig()
    return {"jacobi": JacobiProposer(jacobi)}
