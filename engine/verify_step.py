"""A verify step's logits -> each request's Verified: the tokens it emits (engine/verifier.py's rules,
after the request's logit processors), their logprobs, and what its drafter learns from the rows
(Jacobi's top tokens, PaSS look-ahead / BPD head rows, recycle's emitted hidden state).

Rows: per sampling request 1 + len(draft) logits rows, concatenated in scheduled order
(engine/speculation.py); look-ahead and head rows come apart, in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.sampler import apply_logit_processors, compute_logprobs, get_generator, probs_from_logits
from engine.spec.base import path_to
from engine.types import DraftTree, Request, ScheduledRequest, TokenLogprob, VerifyResult
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
    firsts, wanted = [], []
    for k, lo, hi in zip(top_k, cu_rows, cu_rows[1:]):
        firsts.append(len(wanted))
        if k:
            wanted += range(lo, hi)
    rows = logits if len(wanted) == logits.shape[0] else logits[wanted]
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
