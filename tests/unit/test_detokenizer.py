"""Incremental detokenization (real tokenizer) and stop-string matching."""
from __future__ import annotations

import random

import pytest

from engine.detokenizer import IncrementalDetokenizer, OutputText, StopMatcher
from engine.tokenizer import Tokenizer

OUTPUTS = [
    " Hello world, this is a test.",
    " café naïve résumé Ångström",
    " 日本語のテキストと中文字符",
    " emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧 done",
    "  two leading spaces\n\nand newlines\t tabs",
    "no leading space",
    " mixed <|im_end|> special",
]


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


def _stream(tok, prompt_ids, output_ids, skip=True):
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    deltas = [detok.push(t) for t in output_ids]
    return deltas, detok.flush()


@pytest.mark.parametrize("text", OUTPUTS)
@pytest.mark.parametrize("skip", [True, False])
def test_concatenation_equals_decode(tok, text, skip):
    prompt = tok.encode("The prompt says:", add_special_tokens=False)
    out = tok.encode(text, add_special_tokens=False)
    deltas, rest = _stream(tok, prompt, out, skip)
    assert "".join(deltas) + rest == tok.decode(out, skip_special_tokens=skip)
    assert rest == ""  # valid text: nothing is left held back
    assert not any("\ufffd" in d for d in deltas)  # partial characters are never emitted


def test_first_token_leading_space(tok):
    prompt = tok.encode("Hello", add_special_tokens=False)
    out = tok.encode(" world", add_special_tokens=False)
    deltas, _ = _stream(tok, prompt, out)
    assert deltas[0] == " world"


def test_empty_prompt(tok):
    out = tok.encode("日本 text", add_special_tokens=False)
    deltas, rest = _stream(tok, [], out)
    assert "".join(deltas) + rest == "日本 text"


def test_emoji_is_held_until_complete(tok):
    out = tok.encode(" 😀", add_special_tokens=False)
    assert len(out) > 1
    deltas, _ = _stream(tok, [], out)
    assert deltas[:-1] == [""] * (len(out) - 1) and deltas[-1] == " 😀"


def test_incomplete_tail_released_by_flush(tok):
    out = tok.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    deltas, rest = _stream(tok, [], out)
    assert "".join(deltas) == "ok"
    assert "".join(deltas) + rest == tok.decode(out)
    assert rest.endswith("\ufffd")


def test_random_token_streams(tok):
    rng = random.Random(0)
    text = " ".join(OUTPUTS)
    pool = tok.encode(text, add_special_tokens=False)
    for _ in range(50):
        out = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        deltas, rest = _stream(tok, pool[:7], out)
        assert "".join(deltas) + rest == tok.decode(out)


def test_long_output_keeps_state_small(tok):
    out = tok.encode(" word" * 500, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    text = "".join(detok.push(t) for t in out)
    assert text == " word" * 500
    assert len(detok._ids) < 100


# ---------------------------------------------------------------- StopMatcher


def _feed_all(matcher, deltas):
    out, stopped_at = [], None
    for i, d in enumerate(deltas):
        safe, stopped = matcher.feed(d)
        out.append(safe)
        if stopped:
            stopped_at = i
            break
    return out, stopped_at


def test_no_stops_passes_through():
    m = StopMatcher(())
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


def test_holds_back_possible_prefix_and_never_leaks():
    m = StopMatcher(("STOP",))
    assert m.feed("hello S") == ("hello ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("x") == ("STx", False)  # not a stop after all: released
    assert m.feed(" ST") == (" ", False)
    assert m.feed("OP and more") == ("", True)
    assert m.matched == "STOP"
    assert m.feed("later") == ("", True)


def test_stop_spanning_many_deltas():
    m = StopMatcher(("<END>",))
    out, at = _feed_all(m, ["a", "b<", "E", "N", "D", ">c"])
    assert "".join(out) == "ab" and at == 5


def test_stop_inside_one_delta():
    m = StopMatcher(("\n\n",))
    out, at = _feed_all(m, ["line one", "\n\nline two"])
    assert "".join(out) == "line one" and at == 1


def test_stop_at_start():
    m = StopMatcher(("x",))
    assert m.feed("xyz") == ("", True)


def test_earliest_ending_stop_wins():
    m = StopMatcher(("abcd", "bc"))
    assert m.feed("zabcd") == ("za", True)
    assert m.matched == "bc"
    m = StopMatcher(("world", "o w"))
    assert m.feed("hello world") == ("hell", True)


def test_flush_releases_held_text():
    m = StopMatcher(("STOP", "END"))
    assert m.feed("the E") == ("the ", False)
    assert m.flush() == "E"


def test_overlapping_partial_prefixes():
    m = StopMatcher(("aab",))
    out, at = _feed_all(m, ["a", "a", "a", "b"])
    assert "".join(out) == "a" and at == 3


def test_empty_stop_string_ignored():
    m = StopMatcher(("",))
    assert m.feed("abc") == ("abc", False)


@pytest.mark.parametrize("seed", range(20))
def test_stream_equals_one_shot(seed):
    """However the text is split into deltas, the emitted text is the text before the first stop."""
    rng = random.Random(seed)
    text = "".join(rng.choice("abc ") for _ in range(40))
    stops = tuple({"".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(2)})
    cuts = sorted(rng.sample(range(1, len(text)), 8))
    deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    m = StopMatcher(stops)
    out, at = _feed_all(m, deltas)
    emitted = "".join(out) + ("" if at is not None else m.flush())
    ends = [(text.find(s) + len(s), s) for s in stops if s in text]
    if ends:
        end, stop = min(ends, key=lambda e: (e[0], -len(e[1])))
        assert at is not None and emitted == text[: end - len(stop)]
    else:
        assert at is None and emitted == text


# ---------------------------------------------------------------- OutputText


def test_output_text_stops_on_string(tok):
    prompt = tok.encode("Q:", add_special_tokens=False)
    out = tok.encode(" The answer is 42.\nQ: next", add_special_tokens=False)
    ot = OutputText(tok, prompt, stops=("\nQ:",))
    pieces = []
    for i, t in enumerate(out):
        text, stopped = ot.push(t)
        pieces.append(text)
        if stopped:
            break
    assert stopped and "".join(pieces) == " The answer is 42." == ot.text
    assert ot.finish() == ""


def test_output_text_finish_releases_everything(tok):
    out = tok.encode(" ends with a partial sto", add_special_tokens=False)
    ot = OutputText(tok, [], stops=("stop",))
    streamed = "".join(ot.push(t)[0] for t in out)
    assert streamed == " ends with a partial "
    assert streamed + ot.finish() == " ends with a partial sto" == ot.text
