"""Prompt-lookup drafter (engine/spec/ngram.py): matching rule, budget, incremental index, cost."""
from __future__ import annotations

import random

import pytest

from engine.spec.base import is_chain
from engine.spec.ngram import (ACCURACY_KEY, PENDING_KEY, SCORE_DEPTH, STATE_KEY, CopyAccuracy, NgramIndex,
                               NgramProposer, copy_continuation, num_right)
from engine.types import Request, SamplingParams, SpecParams


def make_request(token_ids, request_id="r", num_draft_tokens=None) -> Request:
    return Request(request_id, list(token_ids), len(token_ids), SamplingParams(),
                   spec=SpecParams(num_draft_tokens=num_draft_tokens))


def drafts(token_ids, k=4, max_drafts=None, proposer=None) -> list[int]:
    proposer = proposer or NgramProposer(num_draft_tokens=k)
    request = make_request(token_ids)
    out = proposer.propose([request], {"r": k if max_drafts is None else max_drafts})
    if "r" not in out:
        return []
    assert is_chain(out["r"]) and out["r"].draft_probs is None
    return out["r"].token_ids


def reference_draft(tokens, k, max_ngram=3) -> list[int]:
    """From-scratch scan: longest suffix n, most recent earlier end e < len, overlapping copy."""
    for n in range(min(max_ngram, len(tokens)), 0, -1):
        suffix = tokens[len(tokens) - n:]
        for e in range(len(tokens) - 1, n - 1, -1):
            if tokens[e - n:e] == suffix:
                text = list(tokens)
                while len(text) < e + k:  # the continuation may run into its own copy
                    text.append(text[len(text) - (len(tokens) - e)])
                return text[e:e + k]
    return []


def test_longest_match_wins():
    # Suffix [1, 2, 3]: 3-gram occurs once (followed by 40), its 2-gram [2, 3] more recently (-> 50),
    # its 1-gram [3] most recently (-> 60). The 3-gram wins.
    tokens = [1, 2, 3, 40, 41, 9, 2, 3, 50, 51, 3, 60, 61, 1, 2, 3]
    assert drafts(tokens, k=2) == [40, 41]
    # Without the 3-gram, the 2-gram wins over the more recent 1-gram.
    tokens = [7, 2, 3, 50, 51, 3, 60, 61, 1, 2, 3]
    assert drafts(tokens, k=2) == [50, 51]
    # Only a 1-gram.
    assert drafts([8, 3, 60, 61, 9, 3], k=2) == [60, 61]


def test_most_recent_occurrence_wins():
    tokens = [1, 2, 3, 10, 11, 1, 2, 3, 20, 21, 5, 1, 2, 3]
    assert drafts(tokens, k=2) == [20, 21]


def test_no_match_and_tiny_texts():
    assert drafts([1, 2, 3, 4]) == []
    assert drafts([5]) == []
    assert drafts([]) == []
    assert drafts([5, 5], k=3) == [5, 5, 5]  # "5" followed by 5, copied past the end


def test_copies_up_to_k_and_respects_budget():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    assert drafts(tokens, k=4) == [4, 5, 6, 7]
    assert drafts(tokens, k=10, max_drafts=3) == [4, 5, 6]
    assert drafts(tokens, k=4, max_drafts=0) == []
    assert drafts(tokens, k=0) == []
    # A per-request num_draft_tokens overrides the server-wide k; the scheduler's budget still caps it.
    proposer = NgramProposer(num_draft_tokens=4)
    out = proposer.propose([make_request(tokens, "a", 2), make_request(tokens, "b")], {"a": 8, "b": 8})
    assert out["a"].token_ids == [4, 5] and out["b"].token_ids == [4, 5, 6, 7]
    # A request missing from max_drafts gets no draft.
    assert proposer.propose([make_request(tokens, "c")], {}) == {}


def test_repeating_pattern_drafted_at_full_length():
    assert drafts([9, 1, 2, 1, 2, 1, 2], k=5) == [1, 2, 1, 2, 1]
    assert copy_continuation([1, 2, 3], 2, 4) == [3, 3, 3, 3]


def test_incremental_index_equals_scratch_scan():
    rng = random.Random(0)
    for trial in range(60):
        vocab = rng.choice([2, 3, 5, 12])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(0, 5))]
        request = make_request(tokens)
        proposer = NgramProposer(num_draft_tokens=8)  # above every budget: max_drafts decides
        for step in range(40):
            k = rng.randrange(0, 6)
            got = proposer.propose([request], {"r": k}).get("r")
            assert (got.token_ids if got else []) == reference_draft(request.token_ids, k), (trial, step)
            index = request.state[STATE_KEY]
            assert index.num_tokens == len(request.token_ids)
            # Appends of 1..4 tokens, like accepted drafts + a bonus token.
            request.token_ids.extend(rng.randrange(vocab) for _ in range(rng.randrange(1, 5)))
        scratch = NgramIndex()
        scratch.update(request.token_ids)
        index.update(request.token_ids)
        assert index.last_end == scratch.last_end


class CountingList(list):
    """Counts the elements the proposer reads, to show per-step work doesn't grow with the text."""

    num_read = 0

    def __getitem__(self, item):
        value = super().__getitem__(item)
        self.num_read += len(value) if isinstance(item, slice) else 1
        return value


def test_per_step_work_is_independent_of_text_length():
    rng = random.Random(1)
    k = 5
    for length in (100, 10_000):
        request = make_request([])
        request.token_ids = CountingList(rng.randrange(50) for _ in range(length))
        proposer = NgramProposer(num_draft_tokens=k)
        proposer.propose([request], {"r": k})  # the one-time indexing of the prompt
        index = request.state[STATE_KEY]
        for _ in range(20):
            request.token_ids.extend([rng.randrange(50), rng.randrange(50)])
            request.token_ids.num_read = 0
            out = proposer.propose([request], {"r": k})
            # 2 new ends (+ 3 tokens of context), the <= 3 suffix lookups, and <= k copied tokens.
            assert request.token_ids.num_read <= 2 + 3 + (3 + 2 + 1) + k
            assert index.update(request.token_ids) == 0  # nothing left to index
            assert "r" not in out or len(out["r"]) == k


# ------------------------------------------------------------ how much of a copy to draft (cutoff)

def test_num_right_counts_the_copy_prefix_the_text_repeated():
    assert num_right([1, 2, 3], [1, 2, 9]) == 2
    assert num_right([1, 2, 3], [7]) == 0
    assert num_right([1, 2, 3], [1, 2]) == 2  # the text has not run the copy's length yet
    assert num_right([1, 2], [1, 2, 3]) == 2


def test_copy_accuracy_blends_its_record_with_the_prior():
    acc = CopyAccuracy(max_ngram=3)
    for right in (0, 1, 3, 3):
        acc.record(2, right)
    assert [acc.chance(2, j, 1.0, 0.0) for j in range(1, 5)] == [0.75, 0.5, 0.5, 0.0]
    assert [acc.chance(2, j, 1.0, 4.0) for j in range(1, 5)] == [7 / 8, 6 / 8, 6 / 8, 4 / 8]
    # Past the scored depth: the last scored depth's chance.
    assert acc.chance(2, SCORE_DEPTH + 5, 0.5, 4.0) == acc.chance(2, SCORE_DEPTH, 0.5, 4.0) == 2 / 8
    assert acc.chance(1, 3, 0.3, 4.0) == 0.3  # no record at that order: the prior


# Suffix [1, 2, 3] matches its earlier 3-gram, after which the text went on 4, 5, 6, 7, 8, 9.
TEXT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3]


def test_copies_are_cut_where_the_servers_record_says_they_go_wrong():
    proposer = NgramProposer(num_draft_tokens=6, cutoff=0.5)
    assert drafts(TEXT, k=6, proposer=proposer) == [4, 5, 6, 7, 8, 9]  # no record yet: the whole copy
    for _ in range(40):  # 3-token matches: right for 2 tokens, then wrong
        proposer.accuracy.record(3, 2)
    assert drafts(TEXT, k=6, proposer=proposer) == [4, 5]
    assert NgramProposer(num_draft_tokens=6, cutoff=0.0).propose([make_request(TEXT)], {"r": 6})["r"].token_ids \
        == [4, 5, 6, 7, 8, 9]
    for _ in range(40):  # other orders' record does not touch 3-token matches
        proposer.accuracy.record(1, 0)
    assert drafts(TEXT, k=6, proposer=proposer) == [4, 5]


def test_each_copy_is_scored_against_the_text_that_followed_it():
    proposer = NgramProposer(num_draft_tokens=4, cutoff=0.1)
    request = make_request(TEXT)
    proposer.propose([request], {"r": 4})  # copies 4, 5, 6, 7, ... (3-token match)
    request.token_ids += [4, 5]  # right so far, the copy not run out: not scored yet
    proposer.propose([request], {"r": 4})
    assert proposer.accuracy.copies[3] == 0
    request.token_ids += [6, 11]  # the first copy was right for 3 tokens; the second (6, 7, ...) for 1
    proposer.propose([request], {"r": 4})
    assert proposer.accuracy.copies[3] == 2 and proposer.accuracy.matched[3][:4] == [2, 1, 1, 0]
    own = request.state[ACCURACY_KEY]
    assert own.copies[3] == 2 and own.matched[3][:4] == [2, 1, 1, 0]
    assert request.state[PENDING_KEY] == []  # 11 is new: no match, no copy made


def test_a_requests_own_record_outweighs_the_servers():
    proposer = NgramProposer(num_draft_tokens=6, cutoff=0.5)
    for _ in range(40):
        proposer.accuracy.record(3, 1)
    assert drafts(TEXT, k=6, proposer=proposer) == [4]
    request = make_request(TEXT)
    own = request.state[ACCURACY_KEY] = CopyAccuracy(max_ngram=3)
    for _ in range(40):  # this request's copies (code being edited, say) were right all the way
        own.record(3, 6)
    assert proposer.propose([request], {"r": 6})["r"].token_ids == [4, 5, 6, 7, 8, 9]


def test_ngram_cutoff_flag_reaches_the_proposer_and_is_checked():
    from engine.config import EngineConfig
    from engine.spec.loading import build_proposers
    from server.cli import build_parser, engine_config

    assert engine_config(build_parser().parse_args(["serve"])).ngram_cutoff == 0.15  # README's default
    config = engine_config(build_parser().parse_args(["serve", "--ngram-cutoff", "0"]))
    assert build_proposers(config, None)["ngram"].cutoff == 0.0
    assert build_proposers(config, None)["jacobi"]._retrieval.cutoff == 0.0  # TR-Jacobi's retrieval chain
    assert build_proposers(engine_config(build_parser().parse_args(["serve"])), None)["jacobi"]._retrieval.cutoff == 0.15
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="ngram_cutoff"):
            EngineConfig(ngram_cutoff=bad)
