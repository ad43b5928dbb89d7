"""The drafter contract and the draft-tree helpers every other part of speculation shares.

A proposer turns each running request into a `DraftTree` (engine/types.py): draft tokens plus a
parent index per node. A chain (LLMA / prompt lookup, PaSS, BPD) is the tree with one child per
node; a real tree (TR-Jacobi, SpecInfer-style multi-draft) has siblings. Tree verification follows
SpecInfer (Miao et al. 2023, "SpecInfer: Accelerating LLM Serving with Tree-based Speculative
Inference and Verification"): all nodes are scored in one forward pass, each node attending to the
real tokens plus its own ancestors (`tree_attention_mask`).

Indexing used here, by the model runner and by engine/verifier.py:
- node i (0 <= i < n) is `tree.token_ids[i]`; `tree.parents[i]` is its parent node, -1 for a child
  of the root. Nodes are in topological order: `parents[i] < i` (`validate` checks it).
- the *root* is the request's last real token (already in `request.token_ids`, not a draft).
- row r of a request's verify input is the root for r = 0 and node r - 1 otherwise, so a request
  with an n-node tree contributes n + 1 rows (EMS-SD: `[last token + its own drafts]`, unpadded).
- node i sits at position `num_tokens - 1 + depths(tree)[i]` (the root at `num_tokens - 1`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from engine.sampler import get_generator, probs_from_logits, sample_from_probs
from engine.types import DraftTree, Request


@runtime_checkable
class Proposer(Protocol):
    """Proposes drafts; never decides how many fit (the scheduler does) and never verifies."""

    name: str
    """The --spec method name, used as the metrics label."""

    def propose(self, requests: list[Request], max_drafts: dict[str, int]) -> dict[str, DraftTree]:
        """Draft for each request at most `max_drafts[request_id]` nodes (0 allowed: no draft).

        Returns request_id -> tree; a request may be missing or get an empty tree (both mean
        "decode one token plainly"). Per-request drafter state lives in `request.state`.
        """
        ...


class NoProposer:
    """`--spec none`: never drafts, so every step verifies zero-node trees (plain decoding)."""

    name = "none"

    def propose(self, requests: list[Request], max_drafts: dict[str, int]) -> dict[str, DraftTree]:
        return {}


# ---------------------------------------------------------------- drafts made by last step's rows


@dataclass
class PendingDrafts:
    """Drafts that extra logits rows of one step made for the next (PaSS look-ahead rows, BPD heads)."""

    drafts: list[int] = field(default_factory=list)
    q: Any = None  # [len(drafts), vocab] draft probabilities, None for greedy (one-hot) drafts
    parents: list[int] | None = None  # the tree's parent per draft (refined BPD's p best paths); None: a chain
    anchor: int = -1
    """len(request.token_ids) the drafts continue; any other length means they are stale."""


def pending(request: Request, key: str) -> PendingDrafts:
    state = request.state.get(key)
    if state is None:
        state = request.state[key] = PendingDrafts()
    return state


def propose_pending(requests: list[Request], max_drafts: dict[str, int], key: str) -> dict[str, DraftTree]:
    """Each request's pending drafts (at most its max) while its text is still the one they continue."""
    out = {}
    for request in requests:
        state = pending(request, key)
        k = min(max_drafts.get(request.request_id, 0), len(state.drafts))
        if state.anchor == request.num_tokens and k > 0:
            q = state.q[:k] if state.q is not None else None
            out[request.request_id] = (chain(state.drafts[:k], q) if state.parents is None
                                       else DraftTree(state.drafts[:k], state.parents[:k], q))
    return out


def set_pending(request: Request, key: str, logits: torch.Tensor | None, anchor: int) -> None:
    """Draft from rows of logits # [n, vocab] (row i: the token i + 1 places after the anchor's last):
    greedy requests take the argmax (one-hot q); sampled ones draw from q = the request's own
    temperature / top-k / top-p applied to the row, with its generator, so the verifier's min(1, p/q)
    test keeps the output exact. None or no rows clears them."""
    state = pending(request, key)
    state.drafts, state.q, state.parents, state.anchor = [], None, None, -1
    if logits is None or logits.shape[0] == 0:
        return
    if request.sampling.greedy:
        state.drafts = logits.argmax(dim=-1).tolist()
    else:
        q = probs_from_logits(logits, [request.sampling] * logits.shape[0])
        state.drafts = sample_from_probs(q, [get_generator(request)] * logits.shape[0]).tolist()
        state.q = q
    state.anchor = anchor


# ---------------------------------------------------------------- building and checking trees


def chain(token_ids: list[int], q=None) -> DraftTree:
    """A chain of drafts (node i's parent is node i - 1).

    q: optional draft probabilities `[len(token_ids), vocab]` (row i = the distribution token i
    was drawn from); None means a deterministic drafter (one-hot q).
    """
    token_ids = [int(t) for t in token_ids]
    return DraftTree(token_ids=token_ids, parents=list(range(-1, len(token_ids) - 1)), draft_probs=q)


def empty_tree() -> DraftTree:
    return DraftTree(token_ids=[], parents=[])


def validate(tree: DraftTree) -> None:
    """Raise ValueError unless the tree is well formed (topological order, matching q rows)."""
    if len(tree.parents) != len(tree.token_ids):
        raise ValueError(f"{len(tree.token_ids)} draft tokens but {len(tree.parents)} parents")
    for i, parent in enumerate(tree.parents):
        if not -1 <= parent < i:
            raise ValueError(f"node {i} has parent {parent}; parents must precede their children")
    q = tree.draft_probs
    if q is not None and (q.dim() != 2 or q.shape[0] != len(tree)):
        raise ValueError(f"draft_probs must be [{len(tree)}, vocab], got {tuple(q.shape)}")


def is_chain(tree: DraftTree) -> bool:
    return all(parent == i - 1 for i, parent in enumerate(tree.parents))


# ---------------------------------------------------------------- structure


def depths(tree: DraftTree) -> list[int]:
    """Depth of each node: 1 for the root's children (so position = root position + depth)."""
    out: list[int] = []
    for parent in tree.parents:
        out.append(1 if parent < 0 else out[parent] + 1)
    return out


def children(tree: DraftTree) -> list[list[int]]:
    """Children by *row*: `children(tree)[0]` are the root's children, `[i + 1]` node i's.

    Entries are node indices, in the order they appear in the tree (the verifier tries siblings
    in this order, so a proposer lists its most promising branch first).
    """
    out: list[list[int]] = [[] for _ in range(len(tree) + 1)]
    for i, parent in enumerate(tree.parents):
        out[parent + 1].append(i)
    return out


def path_to(tree: DraftTree, node: int) -> list[int]:
    """Node indices from the root's child down to `node` inclusive ([] for node = -1, the root)."""
    path = []
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


def tree_attention_mask(tree: DraftTree, device=None) -> torch.Tensor:
    """Bool `[n + 1, n + 1]` over rows [root, node 0, ..., node n-1]: row j may attend column k
    iff k is j itself or one of j's ancestors (the root is everyone's ancestor).

    This is only the intra-draft block: every row also attends all of the request's cached real
    tokens before the root. For a chain it is the ordinary causal (lower-triangular) mask.
    """
    n = len(tree)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[0, 0] = True
    for i, parent in enumerate(tree.parents):
        # Parents precede children, so the parent's row already holds all of its ancestors.
        mask[i + 1] = mask[parent + 1]
        mask[i + 1, i + 1] = True
    return mask if device is None else mask.to(device)
