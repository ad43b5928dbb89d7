"""`--spec ngram`: prompt lookup, the training-free drafter of LLMA and EMS-SD.

LLMA (Yang et al. 2023, "Inference with Reference: Lossless Acceleration of Large Language Models")
observes that an LLM's output often repeats spans of its context (retrieved documents, code being
edited, earlier turns). EMS-SD (Ni et al. 2024, "EMS-SD: Efficient Multi-sample Speculative Decoding
for Accelerating Large Language Models") uses the same lookup for every request of a batch. Rule:
take the longest suffix (n = 3, then 2, then 1) of the request's prompt + generated tokens that
also occurs EARLIER in that text, pick its most recent earlier occurrence, and draft the (up to k)
tokens that followed it. The drafts are deterministic, so the verifier uses q = one-hot.

How much of a copy to draft (`cutoff`, --ngram-cutoff): copying all k tokens of every match makes
nearly every draft k long or empty, and most of a copy is wasted where the match is weak. Scored on
the model's own Spec-Bench outputs (fp32, 5 per category, k = 8), the chance that a copy's first j
tokens are all right was 0.25, 0.12, 0.08 ... for a 1-token match, 0.48, 0.32, 0.22 ... for 2 tokens
and 0.79, 0.67, 0.58 ... for 3 (chat; code editing higher at every order). So the proposer scores
each copy it made against the text the model went on to write (`CopyAccuracy`, by match order; the
server's record behind each request's own) and drafts the j-th token only while that chance is at
least `cutoff`. Drafts then vary in length by request, which is what EMS-SD's unpadded layout is for
(benchmarks/results/spec_cpu.txt, session 26).

Cost: a per-request index (n-gram -> end of its latest occurrence) lives in
`request.state["ngram"]` and is updated with the tokens appended since the previous call only,
so a step costs O(new tokens + k), never a rescan of the whole text.
"""
from __future__ import annotations

from engine.spec.base import chain
from engine.types import DraftTree, Request

STATE_KEY = "ngram"
PENDING_KEY = "ngram_copies"
"""request.state key: copies not yet scored, as [text length when made, match order, tokens, how many
of them the text has confirmed so far]."""
ACCURACY_KEY = "ngram_accuracy"
"""request.state key: the request's own CopyAccuracy."""
SCORE_DEPTH = 16  # copies are scored this deep; a deeper draft takes the last depth's estimate
SERVER_PRIOR = 4.0  # pseudo-copies, all right, behind the server's record: full copies until it has data
REQUEST_PRIOR = 8.0  # pseudo-copies at the server's estimate behind each request's own record


class NgramIndex:
    """n-gram (as a tuple, n = 1..max_ngram) -> end index e of its most recent occurrence
    `tokens[e - n:e]` that has at least one following token (e < len(tokens)).

    Only occurrences with a continuation are indexed, so the current suffix (which ends at
    len(tokens)) never matches itself: a hit is always an earlier occurrence.
    """

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram
        self.last_end: dict[tuple[int, ...], int] = {}
        self.num_tokens = 0
        """Length of the text indexed so far (ends e < num_tokens are in the index)."""

    def update(self, tokens: list[int]) -> int:
        """Index the occurrences that `tokens` (a longer version of the text) adds; returns how
        many new end positions were indexed (the work done is proportional to it)."""
        if len(tokens) < self.num_tokens:  # the text never shrinks; rebuild if it ever does
            self.last_end.clear()
            self.num_tokens = 0
        start, stop = max(self.num_tokens, 1), len(tokens)
        if start >= stop:
            self.num_tokens = max(self.num_tokens, stop)
            return 0
        # One slice covering the new ends plus the max_ngram - 1 tokens before them.
        lo = max(0, start - self.max_ngram)
        window = tokens[lo:stop - 1]
        for e in range(start, stop):
            for n in range(1, min(self.max_ngram, e) + 1):
                self.last_end[tuple(window[e - n - lo:e - lo])] = e
        self.num_tokens = stop
        return stop - start

    def lookup(self, tokens: list[int]) -> int | None:
        """End index of the most recent earlier occurrence of the longest matching suffix."""
        match = self.match(tokens)
        return None if match is None else match[0]

    def match(self, tokens: list[int]) -> tuple[int, int] | None:
        """(end index, n) of the most recent earlier occurrence of the longest matching suffix."""
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            end = self.last_end.get(tuple(tokens[len(tokens) - n:]))
            if end is not None:
                return end, n
        return None


def copy_continuation(tokens: list[int], end: int, k: int) -> list[int]:
    """The k tokens that followed `tokens[:end]`, copied as an overlapping (LZ77-style) copy:
    past the end of the text the copy continues with its own output, so a repeating pattern
    keeps being drafted at full length instead of stopping at the text's end."""
    num_tokens = len(tokens)
    draft = list(tokens[end:min(end + k, num_tokens)])
    period = num_tokens - end  # draft[j] = draft[j - period] once the source runs past the text
    while len(draft) < k:
        draft.append(draft[len(draft) - period])
    return draft


class CopyAccuracy:
    """How far copies turned out right, by match order n: of `copies[n]` scored copies,
    `matched[n][j - 1]` began with j tokens equal to the text that followed them."""

    def __init__(self, max_ngram: int):
        self.copies = [0.0] * (max_ngram + 1)
        self.matched = [[0.0] * SCORE_DEPTH for _ in range(max_ngram + 1)]

    def record(self, order: int, num_right: int) -> None:
        self.copies[order] += 1
        row = self.matched[order]
        for j in range(num_right):
            row[j] += 1

    def chance(self, order: int, depth: int, prior: float, prior_weight: float) -> float:
        """The chance that a copy's first `depth` tokens are right (non-increasing in depth; past
        SCORE_DEPTH, the last scored depth's), with `prior_weight` pseudo-copies at `prior`."""
        right = self.matched[order][min(depth, SCORE_DEPTH) - 1]
        return (right + prior_weight * prior) / (self.copies[order] + prior_weight)


def num_right(copy: list[int], followed: list[int]) -> int:
    """How many of the copy's first tokens equal the text that followed it."""
    for j, (drafted, written) in enumerate(zip(copy, followed)):
        if drafted != written:
            return j
    return min(len(copy), len(followed))


class NgramProposer:
    """Prompt-lookup proposer: a chain of up to k tokens per request, or nothing without a match."""

    name = "ngram"

    def __init__(self, num_draft_tokens: int = 5, max_ngram: int = 3, cutoff: float = 0.0):
        if num_draft_tokens < 0 or max_ngram < 1:
            raise ValueError("num_draft_tokens must be >= 0 and max_ngram >= 1")
        if not 0.0 <= cutoff <= 1.0:
            raise ValueError("cutoff must be between 0 and 1")
        self.num_draft_tokens = num_draft_tokens
        self.max_ngram = max_ngram
        self.cutoff = cutoff
        """Draft the j-th copied token only while its chance of being accepted is at least this."""
        self.accuracy = CopyAccuracy(max_ngram)
        """The server's record, over every request this proposer has drafted for."""

    def propose(self, requests: list[Request], max_drafts: dict[str, int]) -> dict[str, DraftTree]:
        out: dict[str, DraftTree] = {}
        for request in requests:
            k = min(max_drafts.get(request.request_id, 0), self._k(request))
            draft = self.draft_tokens(request, k)
            if draft:
                out[request.request_id] = chain(draft)
        return out

    def draft_tokens(self, request: Request, k: int) -> list[int]:
        """Update the request's index with its new tokens, then look up at most k drafts."""
        index = request.state.get(STATE_KEY)
        if index is None:
            index = request.state[STATE_KEY] = NgramIndex(self.max_ngram)
        tokens = request.token_ids
        # Indexed even when k = 0, so a request that gets a draft budget later costs no catch-up.
        index.update(tokens)
        if self.cutoff > 0:
            self._score_copies(request, tokens)
        match = index.match(tokens) if k > 0 else None
        if match is None:
            return []
        end, order = match
        if self.cutoff <= 0:
            return copy_continuation(tokens, end, k)
        copy = copy_continuation(tokens, end, max(k, SCORE_DEPTH))
        request.state.setdefault(PENDING_KEY, []).append([len(tokens), order, copy[:SCORE_DEPTH], 0])
        return copy[:self._trusted_length(request, order, k)]

    def _score_copies(self, request: Request, tokens: list[int]) -> None:
        """Record each earlier copy once the text that followed it shows how far it was right: at
        its first wrong token, or when the text has run its whole length. Each pending copy keeps how
        many of its tokens the text has confirmed, so a step compares only the tokens it added."""
        pending = request.state.get(PENDING_KEY)
        if not pending:
            return
        own = request.state.setdefault(ACCURACY_KEY, CopyAccuracy(self.max_ngram))
        unscored = []
        for entry in pending:
            start, order, copy, right = entry
            followed = tokens[start + right:start + len(copy)]
            right += num_right(copy[right:], followed)
            if right < len(copy) and right - entry[3] == len(followed):  # right so far, not run out
                entry[3] = right
                unscored.append(entry)
            else:
                own.record(order, right)
                self.accuracy.record(order, right)
        request.state[PENDING_KEY] = unscored

    def _trusted_length(self, request: Request, order: int, k: int) -> int:
        """The longest prefix of a copy (at most k) whose every token's chance is >= cutoff: the
        request's own record, behind it the server's, behind that full copies."""
        own: CopyAccuracy | None = request.state.get(ACCURACY_KEY)
        length = 0
        while length < k:
            chance = self.accuracy.chance(order, length + 1, 1.0, SERVER_PRIOR)
            if own is not None:
                chance = own.chance(order, length + 1, chance, REQUEST_PRIOR)
            if chance < self.cutoff:
                break
            length += 1
        return length

    def _k(self, request: Request) -> int:
        k = request.spec.num_draft_tokens
        return self.num_draft_tokens if k is None else k
