"""`--spec ngram`: prompt lookup, the training-free drafter of LLMA and EMS-SD.

LLMA (Yang et al. 2023, "Inference with Reference: Lossless Acceleration of Large Language Models")
observes that an LLM's output often repeats spans of its context (retrieved documents, code being
edited, earlier turns). EMS-SD (Ni et al. 2024, "EMS-SD: Efficient Multi-sample Speculative Decoding
for Accelerating Large Language Models") uses the same lookup for every request of a batch. Rule:
take the longest suffix (n = 3, then 2, then 1) of the request's prompt + generated tokens that
also occurs EARLIER in that text, pick its most recent earlier occurrence, and draft the (up to k)
tokens that followed it. The drafts are deterministic, so the verifier uses q = one-hot.

Cost: a per-request index (n-gram -> end of its latest occurrence) lives in
`request.state["ngram"]` and is updated with the tokens appended since the previous call only,
so a step costs O(new tokens + k), never a rescan of the whole text.
"""
from __future__ import annotations

from engine.spec.base import chain
from engine.types import DraftTree, Request

STATE_KEY = "ngram"


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
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            end = self.last_end.get(tuple(tokens[len(tokens) - n:]))
            if end is not None:
                return end
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


class NgramProposer:
    """Prompt-lookup proposer: a chain of up to k tokens per request, or nothing without a match."""

    name = "ngram"

    def __init__(self, num_draft_tokens: int = 5, max_ngram: int = 3):
        if num_draft_tokens < 0 or max_ngram < 1:
            raise ValueError("num_draft_tokens must be >= 0 and max_ngram >= 1")
        self.num_draft_tokens = num_draft_tokens
        self.max_ngram = max_ngram

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
        if k <= 0:
            return []
        end = index.lookup(tokens)
        return [] if end is None else copy_continuation(tokens, end, k)

    def _k(self, request: Request) -> int:
        k = request.spec.num_draft_tokens
        return self.num_draft_tokens if k is None else k
