"""`--spec jacobi`: TR-Jacobi decoding, the drafter of "Make Some Noise" (MSN).

Wang et al. 2024, "Make Some Noise: Unlocking Language Model Parallel Inference Capability through
Noisy Training". Jacobi decoding feeds a window of guessed future tokens through the model with
the real ones; the model's outputs at the window's positions become the next step's guesses (the
Jacobi iteration), so a window converges to the greedy continuation a few tokens per step. MSN's
TR-Jacobi ("tree + retrieval") verifies, in one forward pass, a sparse tree made of:

(a) the Jacobi window: at depth m the top-K tokens the model output for that position at the
    previous step's rejected positions. Template (this file's choice of the paper's sparse trees):
    the MAIN CHAIN holds each depth's most likely token, one node per depth; the main-chain node at
    depth m - 1 (the root for m = 1) also gets the other `top_k[m - 1] - 1` alternatives of depth m
    as LEAF children ("side alternatives"). With top_k = (2, 1, 1, 1):

        root ─ w1[0] ─ w2[0] ─ w3[0] ─ w4[0]        main chain (the Jacobi window)
          ├─── w1[1]                                side alternative (leaf)
          └─── r1 ─ r2 ─ r3 ─ r4                    retrieval chain

(b) a retrieval chain: the prompt-lookup continuation of engine/spec/ngram.py (LLMA / EMS-SD),
    computed by the same NgramProposer on the SAME per-request index (`request.state["ngram"]`),
    and cut by the same rule (`--ngram-cutoff`): only as far as copies from matches that long
    have proved right.

Siblings with equal tokens are merged (the tree is a trie), so e.g. a retrieval chain that starts
like the main chain shares its nodes. When the node budget binds, nodes are kept in priority order
main chain, retrieval chain, side alternatives (insertion order keeps parents before children), but
the two chains swap places once the retrieval chain's first node has been accepted more often than
the main chain's: the paper's order assumes a model noise-trained for Jacobi windows. On the default
model, not noise-trained, a main chain's first node was on the accepted path for 6% of its offers and
a retrieval chain's for 39% (8 clients, 35 Spec-Bench prompts, every draft verified, session 19);
with 5 drafts per request the retrieval chain then got one node.

Branch weights: the controller values a draft at depth d as alpha^d (alpha: the request's chance of
accepting one more token), which holds for a chain but not for a tree, whose nodes at one depth share
that chance unequally. `node_weights` gives each node's share, kind by kind (main, retrieval,
alternative) and depth: its acceptance rate over the rate at which accepted paths reach that depth,
both counted over every verified tree of the server's life. Counting each node as alpha^d made the
controller verify main-chain nodes it valued at ~0.3 tokens that earned 0.06.

Window slots the model never filled (a fresh request, a window consumed by acceptance, or a window
shorter than `depth`) start from the request's own context: slot m gets the token that followed
the most recent earlier occurrence of the longest n-gram (n = 3..1) ending at slot m - 1 (an n-gram
model of the request's own text, read off the shared NgramIndex); without any match, the previous
slot's token is repeated. So a fresh window starts out as (about) the prompt-lookup continuation.

The drafts are deterministic (draft_probs = None): the verifier uses one-hot q, which keeps both
greedy and sampled decoding lossless. The MSN noisy fine-tune only raises acceptance; it is not
needed for correctness.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from engine.spec.base import depths
from engine.spec.ngram import STATE_KEY as NGRAM_STATE_KEY
from engine.spec.ngram import NgramIndex, NgramProposer
from engine.types import DraftTree, Request, VerifyResult

STATE_KEY = "jacobi"
MAIN, RETRIEVAL, ALTERNATIVE = "main", "retrieval", "alternative"
WEIGHT_PRIOR = 4.0
"""Pseudo-offers behind a branch kind's acceptance rate at a depth, at the path's rate (weight 1)."""
MAX_NGRAM = 3
"""The n-gram order of the shared index (NgramProposer's default, so both methods share one)."""


@dataclass(frozen=True)
class JacobiConfig:
    """The tree shape; configs/spec/jacobi.yaml maps onto it 1:1."""

    depth: int = 4
    """Jacobi window length = depth of the main chain."""
    top_k: tuple[int, ...] = (2, 1, 1, 1)
    """Tokens tried at each depth (main chain + side alternatives); len == depth."""
    retrieval_len: int = 4
    """Length of the n-gram retrieval chain (0 disables it)."""
    max_nodes: int = 8
    """Cap on draft nodes per request (the engine may pass a smaller max_drafts)."""

    def __post_init__(self):
        object.__setattr__(self, "top_k", tuple(int(k) for k in self.top_k))
        if self.depth < 1 or len(self.top_k) != self.depth:
            raise ValueError(f"depth must be >= 1 and top_k must have depth ({self.depth}) entries")
        if any(k < 1 for k in self.top_k):
            raise ValueError("every top_k entry must be >= 1")
        if self.retrieval_len < 0 or self.max_nodes < 0:
            raise ValueError("retrieval_len and max_nodes must be >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> "JacobiConfig":
        """Build from a parsed configs/spec/jacobi.yaml, rejecting unknown keys."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown JacobiConfig keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "JacobiConfig":
        import yaml

        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})


@dataclass
class JacobiState:
    """One request's Jacobi iteration state (`request.state["jacobi"]`)."""

    window: list[list[int]] = field(default_factory=list)
    """window[m - 1]: the model's top-K guesses (most likely first) for depth m after the root."""
    anchor: int = -1
    """len(request.token_ids) the window continues; a mismatch means the window is stale."""
    proposed_at: int = -1
    """len(request.token_ids) when the last tree was built (observe() anchors the window on it)."""
    num_nodes: int = 0
    """Size of the last proposed tree (observe() checks the verified draft is that tree)."""
    chain_nodes: list[int] = field(default_factory=list)
    """Node index of the last tree's main chain at depth 1, 2, ..."""
    node_kinds: list[str] = field(default_factory=list)
    """MAIN, RETRIEVAL or ALTERNATIVE per node of the last tree: the branch that inserted it."""
    node_depths: list[int] = field(default_factory=list)
    """Depth of each node of the last tree (1: a child of the root)."""


class _TrieBuilder:
    """Appends nodes in insertion order (so parents precede children), merging equal siblings,
    until `budget` nodes exist."""

    def __init__(self, budget: int):
        self.budget = budget
        self.token_ids: list[int] = []
        self.parents: list[int] = []
        self.kinds: list[str] = []  # the branch that inserted each node
        self._child: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    def add(self, parent: int, token: int, kind: str) -> int | None:
        """The node for `token` under `parent` (existing or new); None when the budget is spent."""
        node = self._child.get((parent, token))
        if node is not None:
            return node
        if len(self.token_ids) >= self.budget:
            return None
        node = self._child[(parent, token)] = len(self.token_ids)
        self.token_ids.append(token)
        self.parents.append(parent)
        self.kinds.append(kind)
        return node

    def add_path(self, token_ids: list[int], kind: str) -> list[int]:
        """Insert a chain from the root; returns its node per depth (stops at the budget)."""
        nodes, parent = [], -1
        for token in token_ids:
            node = self.add(parent, token, kind)
            if node is None:
                break
            nodes.append(node)
            parent = node
        return nodes

    def tree(self) -> DraftTree:
        return DraftTree(token_ids=self.token_ids, parents=self.parents, draft_probs=None)


class JacobiProposer:
    """TR-Jacobi drafter: a sparse Jacobi-window tree plus a retrieval chain (module docstring)."""

    name = "jacobi"

    def __init__(self, config: JacobiConfig = JacobiConfig(), retrieval_cutoff: float = 0.0):
        self.config = config
        # Reused, not rewritten: its draft_tokens() keeps request.state["ngram"] up to date, and
        # cuts a copy where copies from matches that long have gone wrong (--ngram-cutoff).
        self._retrieval = NgramProposer(num_draft_tokens=config.retrieval_len, max_ngram=MAX_NGRAM,
                                        cutoff=retrieval_cutoff)
        self._node_stats: dict[tuple[str, int], list[int]] = {}  # (kind, depth) -> [offered, accepted]
        self._reach_stats: dict[int, list[int]] = {}  # depth -> [trees that had it, paths that reached it]

    @property
    def top_k_needed(self) -> int:
        """How many top tokens per row observe() needs."""
        return max(self.config.top_k)

    # ------------------------------------------------------------ propose

    def propose(self, requests: list[Request], max_drafts: dict[str, int]) -> dict[str, DraftTree]:
        out: dict[str, DraftTree] = {}
        for request in requests:
            tree = self.draft_tree(request, self._budget(request, max_drafts.get(request.request_id, 0)))
            if len(tree):
                out[request.request_id] = tree
        return out

    def draft_tree(self, request: Request, budget: int) -> DraftTree:
        """Build one request's tree of at most `budget` nodes and remember it for observe()."""
        state = _state(request)
        # Always called, so the shared index stays current even while the budget is 0.
        retrieval = self._retrieval.draft_tokens(request, self.config.retrieval_len if budget > 0 else 0)
        builder = _TrieBuilder(budget)
        chain_nodes: list[int] = []
        if budget > 0:
            window = self._window(request, state)
            if self._retrieval_first():
                builder.add_path(retrieval, RETRIEVAL)
                chain_nodes = builder.add_path([guesses[0] for guesses in window], MAIN)
            else:
                chain_nodes = builder.add_path([guesses[0] for guesses in window], MAIN)
                builder.add_path(retrieval, RETRIEVAL)
            self._add_side_alternatives(builder, window, chain_nodes)
        state.proposed_at = request.num_tokens
        state.num_nodes = len(builder.token_ids)
        state.chain_nodes = chain_nodes
        tree = builder.tree()
        state.node_kinds, state.node_depths = builder.kinds, depths(tree)
        return tree

    def node_weights(self, request: Request, tree: DraftTree) -> list[float]:
        """Each node's share of its depth's acceptance (module docstring), for a prefix of the
        request's last tree: 1 for every node until the server has verified trees."""
        state = _state(request)
        return [self._weight(kind, depth) for kind, depth in zip(state.node_kinds[:len(tree)], state.node_depths)]

    def _weight(self, kind: str, depth: int) -> float:
        trees, reached = self._reach_stats.get(depth, (0, 0))
        reach_rate = (reached + 1.0) / (trees + 2.0)
        offered, accepted = self._node_stats.get((kind, depth), (0, 0))
        return (accepted + WEIGHT_PRIOR * reach_rate) / (offered + WEIGHT_PRIOR) / reach_rate

    def _retrieval_first(self) -> bool:
        return self._weight(RETRIEVAL, 1) > self._weight(MAIN, 1)

    def _record(self, kinds: list[str], tree_depths: list[int], result: VerifyResult) -> None:
        """Count a verified tree's nodes by kind and depth, and how deep its accepted path went."""
        accepted = set(result.accepted_nodes)
        for node, (kind, depth) in enumerate(zip(kinds, tree_depths)):
            counts = self._node_stats.setdefault((kind, depth), [0, 0])
            counts[0] += 1
            counts[1] += node in accepted
        for depth in range(1, max(tree_depths, default=0) + 1):
            counts = self._reach_stats.setdefault(depth, [0, 0])
            counts[0] += 1
            counts[1] += result.num_accepted >= depth

    def _budget(self, request: Request, max_drafts: int) -> int:
        budget = min(max_drafts, self.config.max_nodes)
        if request.spec.num_draft_tokens is not None:  # the API's per-request override
            budget = min(budget, request.spec.num_draft_tokens)
        return max(budget, 0)

    def _window(self, request: Request, state: JacobiState) -> list[list[int]]:
        """The model's guesses if they continue the current text, padded to `depth` from context."""
        window = state.window if state.anchor == request.num_tokens else []
        window = [list(guesses) for guesses in window[:self.config.depth]]
        index: NgramIndex = request.state[NGRAM_STATE_KEY]
        # Only the last MAX_NGRAM tokens matter to a lookup: no copy of the whole text.
        tail = request.token_ids[-MAX_NGRAM:] + [guesses[0] for guesses in window]
        while len(window) < self.config.depth and tail:
            token = _context_next(request.token_ids, index, tail)
            window.append([token])
            tail.append(token)
        return window

    def _add_side_alternatives(self, builder: _TrieBuilder, window: list[list[int]],
                               chain_nodes: list[int]) -> None:
        """Depth m's alternatives 2..top_k[m-1] as leaves under the main chain at depth m - 1."""
        for depth, guesses in enumerate(window, start=1):
            if depth - 1 > len(chain_nodes):  # the main chain was cut above this depth
                break
            parent = chain_nodes[depth - 2] if depth > 1 else -1
            for token in guesses[1:self.config.top_k[depth - 1]]:
                if builder.add(parent, token, ALTERNATIVE) is None:
                    return

    # ------------------------------------------------------------ observe

    def observe(self, request: Request, result: VerifyResult, row_top_tokens: list[list[int]]) -> None:
        """Jacobi iteration: the main chain's rows past the accepted depth a become the next window.

        The main-chain node at depth d predicts (its row) the token at depth d + 1. After a accepted
        tokens plus the bonus/recovered one, the new root sits at old depth a + 1, so the next
        window's depth m is old depth a + 1 + m: the row of the main-chain node at depth a + m.
        This holds whichever branch (main, side, retrieval) the accepted path took, since only
        depth matters for the position. The rows are conditioned on rejected (noisy) tokens: that
        noise is what MSN trains the model to tolerate.
        """
        state = _state(request)
        proposed_at, state.proposed_at = state.proposed_at, -1  # one observe per proposal
        state.window, state.anchor = [], -1
        if proposed_at >= 0 and 0 < result.num_draft <= len(state.node_kinds):  # a prefix of our tree
            self._record(state.node_kinds[:result.num_draft], state.node_depths[:result.num_draft], result)
        if proposed_at < 0 or result.num_draft != state.num_nodes:
            return  # not the tree we proposed (or none): nothing to iterate on
        a = result.num_accepted
        window = []
        for node in state.chain_nodes[a:]:
            row = node + 1
            if row >= len(row_top_tokens) or not row_top_tokens[row]:
                break
            window.append([int(t) for t in row_top_tokens[row][:self.top_k_needed]])
        state.window = window
        state.anchor = proposed_at + len(result.token_ids)


def _state(request: Request) -> JacobiState:
    state = request.state.get(STATE_KEY)
    if state is None:
        state = request.state[STATE_KEY] = JacobiState()
    return state


def _context_next(token_ids: list[int], index: NgramIndex, tail: list[int]) -> int:
    """The token that followed the latest earlier occurrence of the longest n-gram ending `tail`
    (an n-gram model of the request's own text); `tail[-1]` again without any match."""
    end = index.lookup(tail)
    return token_ids[end] if end is not None else tail[-1]
