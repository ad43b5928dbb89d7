"""Draft verification: greedy and stochastic acceptance over ragged chains and trees.

Vocabulary (used the same way everywhere in specd):
- *draft* tokens: tokens a proposer guessed for a request; not yet checked by the target model.
  They form a `DraftTree` (engine/spec/base.py; a chain is a tree with one child per node).
- *accepted* tokens: the drafts along one root-to-node path that the target model agreed with.
- *bonus* token: when every draft along the accepted path was accepted and the last accepted node
  has no child left to try, the target's own token sampled (or argmax'd) from that node's row.
- *recovered* token: at the first rejection, the token sampled from the residual distribution
  norm(max(p - q, 0)) (after all siblings were rejected: recursive residuals); in greedy mode the
  target's argmax at that row.
Every step emits the accepted tokens plus exactly ONE bonus-or-recovered token, so a request with
no drafts (zero-node tree) simply gets one ordinary token: `--spec none` runs the same code.

Rows: a request with an n-node tree has n + 1 target rows; row 0 is the distribution after the last
real token (the root), row i + 1 the distribution after node i. In a batch the rows of all requests
are concatenated in request order with offsets `cu_rows` (EMS-SD's unpadded layout).

Lossless by construction:
- Greedy: accept the longest path whose every node equals the target argmax of its parent's row
  (ties between sibling branches: the first-listed child wins); each accepted token is then exactly
  what plain greedy decoding would produce.
- Stochastic: speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
  Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
  Speculative Sampling"), generalized to trees by SpecInfer's recursive rejection over siblings
  (Miao et al. 2023, "SpecInfer"): at a node whose current target is p, try its children c1..cm in
  order; child c with token x is accepted with probability min(1, p(x) / q_c(x)); on rejection
  p <- norm(max(p - q_c, 0)) and the next sibling is tried against that residual. If a child is
  accepted the walk descends with p = its row; if all are rejected (or there are none) the final
  token is drawn from the current p. This is exact whenever node c's token was drawn from q_c
  given everything before it (its ancestors and its earlier siblings): iid siblings share one q,
  siblings drawn without replacement carry the renormalized q, and deterministic drafters
  (q = None) are one-hot, which makes a rejection zero that token and renormalize -- so duplicate
  sibling tokens are harmless (the duplicate is accepted with probability 0).
"""
from __future__ import annotations

import math

import torch

from engine.sampler import sample_from_probs
from engine.spec.base import children, validate
from engine.types import DraftTree, VerifyResult
from specd_kernels import backend as kernel_backend
from specd_kernels import rejection as kernel_rejection

# ---------------------------------------------------------------- the sampling primitives


def sample_token(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token from `probs` ([vocab], non-negative, not necessarily normalized).

    The one sampling rule for plain, bonus and recovered tokens: the sampler's inverse-CDF draw with
    one uniform from the request's own generator, so a seeded request's tokens don't depend on what
    else is batched. A zero-probability token is never drawn.
    """
    total = float(probs.sum())
    if not math.isfinite(total) or total <= 0.0:  # a bug upstream, not a token
        raise ValueError("cannot sample: the probabilities sum to zero or are not finite")
    generator = generator if generator is not None else torch.default_generator
    return int(sample_from_probs(probs.unsqueeze(0), [generator])[0])


def accepts(u: float, p_x: float, q_x: float) -> bool:
    """Speculative sampling's test: with u ~ U[0, 1), true with probability min(1, p_x / q_x)."""
    return u * q_x < p_x


def residual(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    """norm(max(p - q, 0)) after rejecting `token` drawn from q ([vocab] each; q None = one-hot)."""
    if q is None:
        r = p.clone()
        r[token] = 0.0
    else:
        r = torch.clamp(p - q, min=0.0)
    total = float(r.sum())
    # Exact arithmetic never rejects when p <= q everywhere (then p == q); rounding can, and
    # then p itself is the right distribution to fall back to.
    return r / total if total > 0.0 else p


# ---------------------------------------------------------------- one request


def verify_greedy(tree: DraftTree, target_tokens: list[int], request_id: str = "") -> VerifyResult:
    """Longest path whose nodes all equal their parent row's target token, plus the bonus/recovered.

    target_tokens: [n + 1] argmax of each row of the processed logits (penalties, logit_bias).
    """
    n = len(tree)
    kids = children(tree)
    # Post-order over the topological order: children always have larger indices than parents.
    best_len = [0] * (n + 1)  # by row: length of the longest matching path below it
    best_child = [-1] * (n + 1)
    for row in range(n, -1, -1):
        for c in kids[row]:
            if tree.token_ids[c] == target_tokens[row] and best_len[c + 1] + 1 > best_len[row]:
                best_len[row], best_child[row] = best_len[c + 1] + 1, c
    accepted, row = [], 0
    while best_child[row] >= 0:
        accepted.append(best_child[row])
        row = best_child[row] + 1
    token_ids = [tree.token_ids[c] for c in accepted] + [int(target_tokens[row])]
    return VerifyResult(request_id, token_ids, n, len(accepted), accepted)


def first_test_probs(trees: list[DraftTree], probs: torch.Tensor, cu_rows: list[int]) -> list[list[float]]:
    """Per tree, p(x) of every node's token in its parent's row: the target probability each
    node's FIRST acceptance test uses. One gather and one device sync for the whole batch.

    probs: [total_rows, vocab]; tree i owns rows cu_rows[i]:cu_rows[i] + len(tree) + 1.
    """
    vocab = probs.shape[-1]
    flat = [(cu + parent + 1) * vocab + x for tree, cu in zip(trees, cu_rows)
            for parent, x in zip(tree.parents, tree.token_ids)]
    values = probs.reshape(-1)[torch.tensor(flat, dtype=torch.long, device=probs.device)].tolist()
    out, start = [], 0
    for tree in trees:
        out.append(values[start:start + len(tree)])
        start += len(tree)
    return out


def verify_stochastic(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None,
                      request_id: str = "", p_x: list[float] | None = None) -> VerifyResult:
    """Recursive rejection sampling down the tree (see the module docstring).

    probs: [n + 1, vocab] fp32 target probabilities, already temperature / top-k / top-p processed.
    tree.draft_probs: [n, vocab] q per node on probs' device, or None for a deterministic (one-hot)
    drafter. p_x: `first_test_probs` of this tree when the caller batched that gather.
    """
    n = len(tree)
    if n == 0:
        return VerifyResult(request_id, [sample_token(probs[0], generator)], 0, 0, [])
    q, tokens = tree.draft_probs, tree.token_ids
    if p_x is None:
        p_x = first_test_probs([tree], probs, [0])[0]
    if q is None:
        q_x = [1.0] * n
    else:
        flat = [i * q.shape[-1] + x for i, x in enumerate(tokens)]
        q_x = q.reshape(-1)[torch.tensor(flat, dtype=torch.long, device=q.device)].tolist()
    device = generator.device if generator is not None else probs.device
    # A fixed n uniforms per step (node i uses u[i]), so RNG use doesn't depend on the path taken.
    u = torch.rand(n, generator=generator, device=device).tolist()
    kids = children(tree)
    accepted, row = [], 0
    while True:
        target = None  # the row's residual after rejected siblings; None while still probs[row]
        chosen = -1
        for c in kids[row]:
            # q(x) = 0 means the drafter broke its contract (x "impossible"): treat x as one-hot.
            one_hot = q is None or q_x[c] <= 0.0
            qx = 1.0 if one_hot else q_x[c]
            if accepts(u[c], p_x[c] if target is None else float(target[tokens[c]]), qx):
                chosen = c
                break
            target = residual(probs[row] if target is None else target, None if one_hot else q[c], tokens[c])
        if chosen < 0:
            final = sample_token(probs[row] if target is None else target, generator)
            return VerifyResult(request_id, [tokens[c] for c in accepted] + [final], n, len(accepted), accepted)
        accepted.append(chosen)
        row = chosen + 1


# ---------------------------------------------------------------- the ragged batch


def verify(request_ids: list[str], trees: list[DraftTree | None], cu_rows: list[int], greedy: list[bool],
           target_tokens=None, probs: torch.Tensor | None = None,
           generators: list[torch.Generator | None] | None = None) -> list[VerifyResult]:
    """Verify every request of a step; request i owns rows cu_rows[i]:cu_rows[i + 1].

    trees: per request, None or an empty tree = no drafts (one row).
    greedy: per request, True = argmax acceptance (temperature 0).
    target_tokens: [total_rows] argmax per row (tensor or list); needed when any request is greedy.
    probs: [total_rows, vocab] fp32 processed target probabilities; needed when any is stochastic.
    generators: per request, its own torch.Generator (None = torch's default RNG).
    """
    if len(cu_rows) != len(trees) + 1 or len(request_ids) != len(trees) or len(greedy) != len(trees):
        raise ValueError("request_ids, trees, greedy and cu_rows[1:] must have one entry per request")
    trees = [tree if tree is not None else DraftTree([], []) for tree in trees]
    for i, tree in enumerate(trees):
        validate(tree)
        if cu_rows[i + 1] - cu_rows[i] != len(tree) + 1:
            raise ValueError(f"request {request_ids[i]!r}: {cu_rows[i + 1] - cu_rows[i]} rows "
                             f"for a {len(tree)}-node tree")
    on = probs if probs is not None else target_tokens
    if isinstance(on, torch.Tensor) and kernel_backend.use_triton(on):
        return _verify_batched(request_ids, trees, greedy, target_tokens, probs, generators)
    if isinstance(target_tokens, torch.Tensor):
        target_tokens = target_tokens.tolist()  # one sync for the whole batch
    sampled = [i for i in range(len(trees)) if not greedy[i]]
    p_x = dict(zip(sampled, first_test_probs([trees[i] for i in sampled], probs,
                                             [cu_rows[i] for i in sampled]))) if sampled else {}
    results = []
    for i, (request_id, tree) in enumerate(zip(request_ids, trees)):
        lo, hi = cu_rows[i], cu_rows[i + 1]
        if greedy[i]:
            results.append(verify_greedy(tree, target_tokens[lo:hi], request_id))
        else:
            generator = generators[i] if generators is not None else None
            results.append(verify_stochastic(tree, probs[lo:hi], generator, request_id, p_x[i]))
    return results


def _verify_batched(request_ids: list[str], trees: list[DraftTree], greedy: list[bool], target_tokens=None,
                   probs: torch.Tensor | None = None,
                   generators: list[torch.Generator | None] | None = None) -> list[VerifyResult]:
    """`verify` in one kernel launch (specd_kernels/rejection, the GPU path): the same rules, one program
    per request. Sampled requests draw one Philox seed per step from their own generator, so a seeded
    request stays reproducible and independent of the batch (its stream differs from the CPU path's)."""
    device = (probs if probs is not None else target_tokens).device
    tokens = [t for tree in trees for t in tree.token_ids]
    cu_nodes = [0]
    for tree in trees:
        cu_nodes.append(cu_nodes[-1] + len(tree))
    seeds = [0 if g else int(torch.randint(0, 2 ** 62, (1,), generator=_generator(generators, i)))
             for i, g in enumerate(greedy)]
    q = None
    if probs is not None and any(tree.draft_probs is not None for tree, g in zip(trees, greedy) if not g):
        # One q row per node; deterministic drafters' rows one-hot, which is what q = None means.
        q = torch.zeros(len(tokens), probs.shape[1], dtype=torch.float32, device=device)
        q[torch.arange(len(tokens), device=device), torch.tensor(tokens, device=device)] = 1.0
        for tree, lo in zip(trees, cu_nodes):
            if tree.draft_probs is not None:
                q[lo:lo + len(tree)] = tree.draft_probs.to(device, torch.float32)
    as_tensor = lambda values, dtype: torch.as_tensor(values, dtype=dtype, device=device)  # noqa: E731
    out = kernel_rejection.accept(
        as_tensor(tokens, torch.int64), as_tensor([p for tree in trees for p in tree.parents], torch.int32),
        as_tensor(cu_nodes, torch.int32), as_tensor(greedy, torch.bool),
        as_tensor(target_tokens, torch.int64) if target_tokens is not None else None,
        probs, q, as_tensor(seeds, torch.int64) if probs is not None else None, max(map(len, trees), default=0))
    counts, nodes, finals = (t.tolist() for t in (out.num_accepted, out.accepted_nodes, out.final_token_ids))
    results = []
    for i, (request_id, tree) in enumerate(zip(request_ids, trees)):
        if finals[i] < 0:  # a bug upstream, not a token
            raise ValueError("cannot sample: the probabilities sum to zero or are not finite")
        accepted = nodes[i][:counts[i]]
        results.append(VerifyResult(request_id, [tree.token_ids[c] for c in accepted] + [finals[i]],
                                    len(tree), counts[i], accepted))
    return results


def _generator(generators, i: int) -> torch.Generator:
    generator = generators[i] if generators is not None else None
    return generator if generator is not None else torch.default_generator


def emitted_rows(result: VerifyResult) -> list[int]:
    """For each emitted token, the request-local row it was produced at (for logprobs and for
    compacting the accepted path's K/V): the root row, then each accepted node's row."""
    return [0] + [node + 1 for node in result.accepted_nodes]
