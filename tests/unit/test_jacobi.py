"""TR-Jacobi drafter (engine/spec/jacobi.py): tree template, dedup, budget, the Jacobi window
update in observe(), and an end-to-end loop against engine.verifier.verify_greedy with fake models."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.spec.base import depths, empty_tree, path_to, validate
from engine.spec.jacobi import STATE_KEY, JacobiConfig, JacobiProposer, JacobiState
from engine.spec.ngram import STATE_KEY as NGRAM_STATE_KEY
from engine.speculation import trim
from engine.types import Request, SamplingParams, SpecParams, VerifyResult
from engine.verifier import verify_greedy

REPO = Path(__file__).resolve().parents[2]
CHAIN_ONLY = JacobiConfig(depth=4, top_k=(2, 1, 1, 1), retrieval_len=0, max_nodes=16)
ROOMY = JacobiConfig(depth=4, top_k=(2, 1, 1, 1), retrieval_len=4, max_nodes=16)


def make_request(token_ids, num_draft_tokens=None) -> Request:
    return Request("r", list(token_ids), len(token_ids), SamplingParams(),
                   spec=SpecParams(num_draft_tokens=num_draft_tokens))


def with_window(request: Request, window) -> Request:
    """Pretend a previous step left these model guesses for the positions after the last token."""
    request.state[STATE_KEY] = JacobiState(window=[list(g) for g in window], anchor=request.num_tokens)
    return request


def propose(proposer, request, budget):
    tree = proposer.propose([request], {"r": budget}).get("r", empty_tree())
    check_tree(tree, budget)
    return tree


def check_tree(tree, budget):
    validate(tree)  # parents before children
    assert len(tree) <= budget and tree.draft_probs is None
    siblings = [(p, t) for p, t in zip(tree.parents, tree.token_ids)]
    assert len(set(siblings)) == len(siblings), "equal sibling tokens must be merged"


def paths(tree) -> set[tuple[int, ...]]:
    return {tuple(tree.token_ids[j] for j in path_to(tree, i)) for i in range(len(tree))}


# ---------------------------------------------------------------- config


def test_config_defaults_yaml_and_checks():
    assert JacobiConfig.from_yaml(REPO / "configs/spec/jacobi.yaml") == JacobiConfig()
    assert JacobiConfig.from_dict({"depth": 2, "top_k": [3, 1]}).top_k == (3, 1)
    with pytest.raises(ValueError):
        JacobiConfig(depth=3, top_k=(2, 1))
    with pytest.raises(ValueError):
        JacobiConfig(depth=1, top_k=(0,))
    with pytest.raises(ValueError):
        JacobiConfig.from_dict({"depth": 1, "top_k": [1], "width": 3})
    assert JacobiProposer(JacobiConfig(depth=2, top_k=(3, 1))).top_k_needed == 3
    assert JacobiProposer().name == "jacobi"


# ---------------------------------------------------------------- the template


def test_sparse_template_main_chain_side_alternatives_and_retrieval():
    # Context repeats [1, 2, 3]: the retrieval chain is [4, 5, 6, 1].
    request = with_window(make_request([1, 2, 3, 4, 5, 6, 1, 2, 3]), [[7, 8], [9, 10], [11], [12]])
    tree = propose(JacobiProposer(ROOMY), request, 9)
    # Main chain first, then the retrieval branch from the root, then depth 1's side alternative
    # (depth 2's second guess is dropped: top_k[1] = 1).
    assert tree.token_ids == [7, 9, 11, 12, 4, 5, 6, 1, 8]
    assert tree.parents == [-1, 0, 1, 2, -1, 4, 5, 6, -1]
    assert depths(tree) == [1, 2, 3, 4, 1, 2, 3, 4, 1]


def test_wider_template_alternatives_hang_off_the_main_chain():
    proposer = JacobiProposer(JacobiConfig(depth=3, top_k=(3, 2, 1), retrieval_len=0, max_nodes=10))
    tree = propose(proposer, with_window(make_request([50, 51]), [[1, 2, 3], [4, 5, 6], [7, 8]]), 10)
    assert tree.token_ids == [1, 4, 7, 2, 3, 5]
    assert tree.parents == [-1, 0, 1, -1, -1, 0]  # depth-2 alternative 5 is a leaf under node 1


def test_duplicate_siblings_are_merged():
    # The retrieval chain [4, 5, 6, 1] starts like the main chain [4, 5, 9, 9]: shared prefix.
    request = with_window(make_request([1, 2, 3, 4, 5, 6, 1, 2, 3]), [[4, 8], [5], [9], [9]])
    tree = propose(JacobiProposer(JacobiConfig()), request, 8)
    assert paths(tree) >= {(4, 5, 9, 9), (4, 5, 6, 1), (8,)}
    assert len(tree) == 7  # 4 main + 2 retrieval past the shared [4, 5] + 1 alternative
    # A retrieval chain equal to a side alternative merges into it too.
    request = with_window(make_request([1, 2, 3, 4, 5, 6, 1, 2, 3]), [[8, 4], [5], [9], [9]])
    tree = propose(JacobiProposer(JacobiConfig()), request, 8)
    assert tree.token_ids.count(4) == 1 and (4, 5, 6, 1) in paths(tree)


def test_fresh_window_starts_from_context():
    # No model guesses yet: slot m continues the n-gram ending at slot m - 1 in the request's text,
    # i.e. about the prompt-lookup draft, so the retrieval chain merges into the main chain.
    request = make_request([1, 2, 3, 4, 5, 6, 1, 2, 3])
    tree = propose(JacobiProposer(JacobiConfig()), request, 8)
    assert tree.token_ids == [4, 5, 6, 1] and tree.parents == [-1, 0, 1, 2]
    assert NGRAM_STATE_KEY in request.state  # the prompt-lookup index is shared, not duplicated
    # Text without any earlier occurrence of its last token: the slot repeats it.
    assert propose(JacobiProposer(CHAIN_ONLY), make_request([7, 8, 9]), 8).token_ids == [9, 9, 9, 9]


@pytest.mark.parametrize("budget, expected", [
    (0, []), (2, [7, 9]), (5, [7, 9, 11, 12, 4]), (8, [7, 9, 11, 12, 4, 5, 6, 1]),
    (9, [7, 9, 11, 12, 4, 5, 6, 1, 8]),
])
def test_budget_priority_main_then_retrieval_then_alternatives(budget, expected):
    proposer = JacobiProposer(ROOMY)
    request = with_window(make_request([1, 2, 3, 4, 5, 6, 1, 2, 3]), [[7, 8], [9], [11], [12]])
    assert propose(proposer, request, budget).token_ids == expected


def test_retrieval_chain_is_cut_where_copies_go_wrong():
    # The record says 3-token matches are right for 2 tokens: the retrieval chain keeps [4, 5] and
    # the budget it frees goes to the side alternative; cutoff 0 copies the whole chain.
    request = with_window(make_request([1, 2, 3, 4, 5, 6, 1, 2, 3]), [[7, 8], [9], [11], [12]])
    cut = JacobiProposer(ROOMY, retrieval_cutoff=0.5)
    for _ in range(40):
        cut._retrieval.accuracy.record(3, 2)
    assert propose(cut, request, 9).token_ids == [7, 9, 11, 12, 4, 5, 8]
    assert propose(JacobiProposer(ROOMY), request, 9).token_ids == [7, 9, 11, 12, 4, 5, 6, 1, 8]


def verified(proposer, request, budget, accepted_tokens):
    """Propose, then observe a verification of the whole tree that accepted the path of these tokens."""
    tree = propose(proposer, request, budget)
    accepted_nodes, parent = [], -1
    for token in accepted_tokens:
        parent = next(i for i, (p, t) in enumerate(zip(tree.parents, tree.token_ids)) if p == parent and t == token)
        accepted_nodes.append(parent)
    result = VerifyResult("r", token_ids=[0] * (len(accepted_nodes) + 1), num_draft=len(tree),
                          num_accepted=len(accepted_nodes), accepted_nodes=list(accepted_nodes))
    proposer.observe(request, result, [[0]] * (len(tree) + 1))
    return tree


def test_node_weights_learn_which_branch_is_accepted_and_the_better_chain_goes_first():
    proposer = JacobiProposer(ROOMY)
    fresh = lambda: with_window(make_request([1, 2, 3, 4, 5, 6, 1, 2, 3]), [[7, 8], [9], [11], [12]])
    request = fresh()
    tree = propose(proposer, request, 9)
    assert proposer.node_weights(request, tree) == [1.0] * 9  # nothing verified yet: a chain's alpha^d
    for _ in range(30):  # the main chain [7, 9, 11, 12] always rejected, the retrieval [4, 5, 6, 1] accepted
        verified(proposer, fresh(), 9, [4, 5])
    request = fresh()
    tree = propose(proposer, request, 9)
    assert tree.token_ids == [4, 5, 6, 1, 7, 9, 11, 12, 8]  # retrieval chain first now
    weights = proposer.node_weights(request, tree)
    assert weights[:2] == pytest.approx([1.0, 1.0], abs=0.1)  # every path to depth 1 and 2 went through them
    assert max(weights[4:]) < 0.2  # the main chain and the alternative: never accepted
    assert len(proposer.node_weights(request, trim(tree, 3))) == 3  # the prefix the controller is offered


def test_a_verified_prefix_of_the_tree_is_counted_as_what_was_verified():
    proposer = JacobiProposer(ROOMY)
    for _ in range(30):  # only the first two nodes (main chain 7, 9) were verified, and accepted
        request = with_window(make_request([1, 2, 3, 4, 5, 6, 1, 2, 3]), [[7, 8], [9], [11], [12]])
        propose(proposer, request, 9)
        proposer.observe(request, VerifyResult("r", [9, 11, 0], num_draft=2, num_accepted=2, accepted_nodes=[0, 1]),
                         [[0]] * 3)
    request = with_window(make_request([1, 2, 3, 4, 5, 6, 1, 2, 3]), [[7, 8], [9], [11], [12]])
    tree = propose(proposer, request, 9)
    assert tree.token_ids[:4] == [7, 9, 11, 12]  # the main chain stays first
    weights = proposer.node_weights(request, tree)
    assert weights[:2] == pytest.approx([1.0, 1.0], abs=0.1)  # accepted whenever verified, as paths reached
    assert weights[4:8] == pytest.approx([1.0] * 4)  # retrieval never verified: no evidence either way


def test_zero_budget_max_nodes_and_per_request_override():
    proposer = JacobiProposer(JacobiConfig())
    request = make_request([1, 2, 3, 4, 5, 6, 1, 2, 3])
    assert proposer.propose([request], {"r": 0}) == {}
    assert proposer.propose([request], {}) == {}
    assert NGRAM_STATE_KEY in request.state  # still indexed, so a later budget costs no catch-up
    request = with_window(make_request([1, 2, 3, 4, 5, 6, 1, 2, 3]), [[7, 8], [9], [11], [12]])
    assert len(propose(proposer, request, 100)) == JacobiConfig().max_nodes
    request = with_window(make_request([1, 2, 3, 4, 5, 6, 1, 2, 3], num_draft_tokens=3),
                          [[7], [9], [11], [12]])
    assert len(propose(proposer, request, 100)) == 3


# ---------------------------------------------------------------- observe: the Jacobi iteration

PROMPT = [50, 51, 52, 53, 54]


def step(proposer, accepted_nodes, token_ids, window=((10, 11), (20,), (30,), (40,))):
    """Propose from a known window (main chain = nodes 0..3, alternative 11 = node 4), verify with
    a made-up result and rows whose top-2 at row r are [100 + r, 200 + r]; returns the request."""
    request = with_window(make_request(PROMPT), window)
    tree = propose(proposer, request, 8)
    assert tree.token_ids == [10, 20, 30, 40, 11]
    rows = [[100 + r, 200 + r] for r in range(len(tree) + 1)]
    result = VerifyResult("r", list(token_ids), len(tree), len(accepted_nodes), list(accepted_nodes))
    proposer.observe(request, result, rows)
    return request


def test_observe_nothing_accepted_shifts_the_whole_window():
    request = step(JacobiProposer(CHAIN_ONLY), [], [99])
    state = request.state[STATE_KEY]
    # Row of main-chain depth d guesses depth d + 1; the recovered token took depth 1.
    assert state.window == [[101, 201], [102, 202], [103, 203], [104, 204]]
    assert state.anchor == len(PROMPT) + 1


def test_observe_partial_acceptance_keeps_the_rows_past_the_accepted_path():
    proposer = JacobiProposer(CHAIN_ONLY)
    request = step(proposer, [0, 1], [10, 20, 77])
    assert request.state[STATE_KEY].window == [[103, 203], [104, 204]]
    request.token_ids.extend([10, 20, 77])
    tree = propose(proposer, request, 8)
    assert tree.token_ids[:2] == [103, 104] and len(tree) == 5  # 2 guesses + 2 from context
    assert tree.token_ids[4] == 203 and tree.parents[4] == -1  # depth 1's alternative


def test_observe_acceptance_off_the_main_chain_uses_depth():
    # The side alternative (node 4, depth 1) was accepted: the window starts at main-chain depth 2.
    request = step(JacobiProposer(CHAIN_ONLY), [4], [11, 66])
    assert request.state[STATE_KEY].window == [[102, 202], [103, 203], [104, 204]]


def test_observe_everything_accepted_restarts_from_context():
    proposer = JacobiProposer(CHAIN_ONLY)
    request = step(proposer, [0, 1, 2, 3], [10, 20, 30, 40, 54])
    assert request.state[STATE_KEY].window == []
    request.token_ids.extend([10, 20, 30, 40, 54])  # text ...52 53 54 10 20 30 40 54
    assert propose(proposer, request, 8).token_ids == [10, 20, 30, 40]  # context after "54"


def test_stale_or_foreign_window_is_dropped():
    proposer = JacobiProposer(CHAIN_ONLY)
    request = step(proposer, [], [99])
    request.token_ids.extend([99, 98])  # one token more than the window was anchored to
    assert propose(proposer, request, 8).token_ids == [98, 98, 98, 98]
    # A result for a tree this proposer didn't build (size mismatch) leaves no window.
    proposer.observe(request, VerifyResult("r", [5], 3, 0, []), [[1], [2], [3], [4]])
    assert request.state[STATE_KEY].window == []


# ---------------------------------------------------------------- end to end with verify_greedy


def run(top_tokens, prompt, num_tokens, proposer, budget, append_first=False):
    """Draft -> verify_greedy -> observe -> append, like the engine; returns (output, mean accepted
    length = tokens emitted per step)."""
    request = make_request(prompt)
    steps = 0
    while request.num_output_tokens < num_tokens:
        tree = propose(proposer, request, budget)
        prefixes = [request.token_ids] + [request.token_ids + [tree.token_ids[j] for j in path_to(tree, i)]
                                          for i in range(len(tree))]
        rows = [top_tokens(prefix) for prefix in prefixes]
        result = verify_greedy(tree, [row[0] for row in rows], "r")
        if append_first:  # either engine order must work
            request.token_ids.extend(result.token_ids)
        proposer.observe(request, result, rows)
        if not append_first:
            request.token_ids.extend(result.token_ids)
        steps += 1
    return request.output_token_ids[:num_tokens], request.num_output_tokens / steps


def greedy(top_tokens, prompt, num_tokens):
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(top_tokens(tokens)[0])
    return tokens[len(prompt):]


def hashed(*xs) -> int:
    return random.Random(hash(xs)).randrange(1 << 30)


def markov_model(vocab: int, order: int):
    """A deterministic 'model': top tokens depend on the last `order` tokens (small vocab, so the
    text repeats n-grams and drafts are often right)."""
    def top_tokens(prefix):
        h = hashed(*prefix[-order:])
        return [(h + j * 7) % vocab for j in range(3)]
    return top_tokens


def position_model(prefix):
    """Top tokens depend only on the position: the Jacobi iteration's fixed point is reached at
    once, so the window is right even after a rejection (no repetition for retrieval to use)."""
    h = hashed(len(prefix))
    return [h % 50000, (h + 1) % 50000]


CONFIGS = [JacobiConfig(), CHAIN_ONLY, JacobiConfig(depth=3, top_k=(3, 2, 2), retrieval_len=5, max_nodes=12),
           JacobiConfig(depth=1, top_k=(1,), retrieval_len=0, max_nodes=1)]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("budget", [0, 1, 3, 8])
@pytest.mark.parametrize("vocab, order", [(5, 1), (11, 2), (40, 3)])
def test_lossless_against_plain_greedy(config, budget, vocab, order):
    model = markov_model(vocab, order)
    prompt = [random.Random(vocab).randrange(vocab) for _ in range(12)]
    out, _ = run(model, prompt, 60, JacobiProposer(config), budget, append_first=bool(budget % 2))
    assert out == greedy(model, prompt, 60)


def test_repeating_text_accepts_more_than_one_token_per_step():
    pattern = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]  # repeats with period 14

    def model(prefix):
        nxt = pattern[len(prefix) % len(pattern)]
        return [nxt, (nxt + 1) % 10]

    out, mean = run(model, pattern * 2, 200, JacobiProposer(JacobiConfig()), 8)
    assert out == greedy(model, pattern * 2, 200)
    assert mean > 3.0, mean


def test_jacobi_window_alone_converges():
    # Retrieval off and nothing repeats: only the Jacobi iteration can make drafts right.
    out, mean = run(position_model, [1, 2, 3], 100, JacobiProposer(CHAIN_ONLY), 8)
    assert out == greedy(position_model, [1, 2, 3], 100)
    # Steps alternate: a context-filled window (all wrong, 1 token) whose rows are then exact, and
    # that window fully accepted (4 + the bonus = 5 tokens), which empties it again: mean 3.
    assert mean >= 2.9, mean


def test_only_requests_verifying_a_draft_get_their_rows_top_tokens():
    """A step without a draft teaches the window nothing, so its rows need no top-k; the top-k of the
    rows that do is each request's own (gathered, not the step's every row)."""
    import torch

    from engine.config import EngineConfig
    from engine.spec.base import chain
    from engine.speculation import Speculator
    from engine.verify_step import verify_step
    from engine.types import ScheduledRequest

    requests = [Request(f"r{i}", [1, 2, 3], 3, SamplingParams(temperature=0.0, max_tokens=64),
                        spec=SpecParams(method="jacobi")) for i in range(3)]
    drafts = [chain([4, 5]), None, chain([6])]
    entries = [ScheduledRequest(r, 1, d, max_draft_tokens=2) for r, d in zip(requests, drafts)]
    needs = Speculator(EngineConfig(spec="jacobi")).top_k_for(entries)
    assert needs == {"r0": 2, "r2": 2}
    logits = torch.randn(3 + 1 + 2, 50, generator=torch.Generator().manual_seed(0))
    verified = verify_step(logits, entries, needs)
    assert verified[1].row_top_tokens is None
    assert verified[0].row_top_tokens == logits[0:3].topk(2).indices.tolist()
    assert verified[2].row_top_tokens == logits[4:6].topk(2).indices.tolist()
