"""Incremental detokenization and stop-string matching for streamed output (no torch).

`IncrementalDetokenizer` follows vLLM's prefix/read-offset algorithm: every push decodes a short
window of recent token ids twice (up to the last emitted token, and through the new one) and emits
the difference, but only once that difference no longer ends in U+FFFD, i.e. once a character split
across byte-level tokens is complete. Decoding a window that starts a few prompt tokens back gives
the first generated token the leading space a SentencePiece decoder would strip from a lone token.

`StopMatcher` holds back any tail of the text that could still grow into a stop string, so a stream
never shows part of a stop string, and stops that span several deltas are found.

`OutputText` chains the two for the engine: per generated token `text, stopped = out.push(token_id)`;
when the request ends for another reason, `out.finish()` returns the held-back rest.
"""
from __future__ import annotations

from typing import Protocol, Sequence

# How many prompt tokens give the first generated token its context (vLLM uses the same).
PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into finalized text deltas."""

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # ids[prefix_offset:read_offset] is the already-emitted context the next window is decoded after.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it finalizes ('' while a character is still incomplete)."""
        self._ids.append(token_id)
        prefix_text, new_text = self._window_texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_INCOMPLETE):
            return ""
        self._advance()
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end, shown as U+FFFD)."""
        prefix_text, new_text = self._window_texts()
        self._advance()
        return new_text[len(prefix_text):]

    def _window_texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset:]
        num_prefix = self._read_offset - self._prefix_offset
        prefix_text = self._tokenizer.decode(window[:num_prefix], skip_special_tokens=self._skip)
        new_text = self._tokenizer.decode(window, skip_special_tokens=self._skip)
        return prefix_text, new_text

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Only ids from prefix_offset on are ever decoded again; drop the rest so memory stays flat.
        if self._prefix_offset > 64:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0


class StopMatcher:
    """Finds stop strings in a stream of text deltas without ever emitting part of one.

    Among stops completed by the same delta, the one that ends first wins (as if the text had
    arrived one character at a time); only the text before it is returned.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops: tuple[str, ...] = tuple(s for s in stops if s)  # "" would stop before any output
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended generation, if any."""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was completed)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._held + delta
        hit = self._first_stop(text)
        if hit is not None:
            start, stop = hit
            self._held, self.stopped, self.matched = "", True, stop
            return text[:start], True
        keep = self._partial_tail_len(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """Release the held-back text when the request ends for another reason (EOS, length)."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """(start, stop) of the occurrence that ends earliest; ties go to the longer stop."""
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0:
                cand = (start + len(stop), -len(stop), stop)
                best = cand if best is None or cand < best else best
        if best is None:
            return None
        end, neg_len, stop = best
        return end + neg_len, stop

    def _partial_tail_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


class OutputText:
    """Detokenizer + stop matcher: what the engine keeps per request (in `request.state`)."""

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int], stops: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
        self.stop = StopMatcher(stops)
        self.text = ""
        """All text returned so far (what the client has seen)."""

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def push(self, token_id: int) -> tuple[str, bool]:
        """Feed one generated token; return (new text to send, stop string completed at this token)."""
        safe, stopped = self.stop.feed(self.detokenizer.push(token_id))
        self.text += safe
        return safe, stopped

    def finish(self) -> str:
        """The request ends for a reason other than a stop string: return the held-back rest.

        The detokenizer's held-back bytes may themselves complete a stop string, which is honoured.
        """
        if self.stop.stopped:
            return ""
        safe, stopped = self.stop.feed(self.detokenizer.flush())
        if not stopped:
            safe += self.stop.flush()
        self.text += safe
        return safe
