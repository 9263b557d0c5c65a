"""Incremental detokenization and stop strings, with a fake byte-level vocabulary."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.engine.detokenize import IncrementalDetokenizer, StopStringMatcher

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)


def detokenizer_for(pieces: list[bytes]) -> IncrementalDetokenizer:
    """A detokenizer whose token i is pieces[i]."""
    return IncrementalDetokenizer(lambda token: pieces[token])


def decode_all(pieces: list[bytes]) -> list[str]:
    detok = detokenizer_for(pieces)
    return [detok.add(i) for i in range(len(pieces))]


# -- IncrementalDetokenizer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        ([b"he", b"llo"], ["he", "llo"]),
        # é is two bytes: nothing comes out until the character is whole
        ([b"\xc3", b"\xa9"], ["", "é"]),
        # € is three bytes, one per token
        ([b"\xe2", b"\x82", b"\xac"], ["", "", "€"]),
        # an emoji, 4 bytes, one per token
        ([b"\xf0", b"\x9f", b"\x98", b"\x80"], ["", "", "", "😀"]),
        # the emoji split 3 + 1 and 1 + 3, with ASCII around it in the same tokens
        ([b"a\xf0\x9f\x98", b"\x80b"], ["a", "😀b"]),
        ([b"a\xf0", b"\x9f\x98\x80b"], ["a", "😀b"]),
        # the end of one character and the start of the next in one token
        ([b"\xc3", b"\xa9\xe2\x82", b"\xac!"], ["", "é", "€!"]),
    ],
)
def test_multibyte_characters_are_never_split(pieces: list[bytes], expected: list[str]) -> None:
    assert decode_all(pieces) == expected


@SETTINGS
@given(st.text(alphabet=st.characters(codec="utf-8")), st.data())
def test_any_split_of_the_bytes_gives_back_the_text(text: str, data: st.DataObject) -> None:
    encoded = text.encode("utf-8")
    cuts = sorted(data.draw(st.sets(st.integers(0, len(encoded)), max_size=12)))
    bounds = [0, *cuts, len(encoded)]
    pieces = [encoded[a:b] for a, b in itertools.pairwise(bounds)]

    detok = detokenizer_for(pieces)
    emitted = ""
    for i in range(len(pieces)):
        emitted += detok.add(i)
        assert text.startswith(emitted)   # never a replacement character, never a half char
    assert emitted + detok.flush() == text
    assert emitted == text


def test_flush_reports_an_incomplete_character_instead_of_dropping_it() -> None:
    detok = detokenizer_for([b"ok\xe2\x82"])
    assert detok.add(0) == "ok"
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_invalid_bytes_become_replacement_characters() -> None:
    assert decode_all([b"a\xffb"]) == ["a\ufffdb"]


# -- StopStringMatcher ---------------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, parts: list[str]) -> list[tuple[str, bool]]:
    return [matcher.feed(part) for part in parts]


def test_no_stops_passes_text_straight_through() -> None:
    matcher = StopStringMatcher(())
    assert feed_all(matcher, ["a#", "#b"]) == [("a#", False), ("#b", False)]
    assert matcher.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    matcher = StopStringMatcher(("",))
    assert matcher.feed("abc") == ("abc", False)


def test_stop_string_straddling_feeds_is_caught_and_never_released() -> None:
    matcher = StopStringMatcher(("###",))
    results = feed_all(matcher, ["ab#", "#", "#cd"])
    assert results == [("ab", False), ("", False), ("", True)]
    assert "".join(text for text, _ in results) == "ab"


def test_stop_string_inside_one_feed() -> None:
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("abcSTOPdef") == ("abc", True)


def test_text_that_only_looked_like_a_stop_is_released() -> None:
    matcher = StopStringMatcher(("END",))
    assert matcher.feed("hello E") == ("hello ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("x") == ("ENx", False)


def test_held_text_is_released_as_soon_as_it_cannot_be_a_stop() -> None:
    # "aab": after "aa" the held "aa" is not a prefix of "ab", but its last "a" still is.
    matcher = StopStringMatcher(("ab",))
    assert matcher.feed("a") == ("", False)
    assert matcher.feed("a") == ("a", False)
    assert matcher.feed("b") == ("", True)


def test_flush_releases_the_held_text() -> None:
    matcher = StopStringMatcher(("END",))
    assert matcher.feed("foo EN") == ("foo ", False)
    assert matcher.flush() == "EN"
    assert matcher.flush() == ""


def test_any_of_several_stops() -> None:
    matcher = StopStringMatcher(("foo", "bar"))
    assert feed_all(matcher, ["xxba", "r yy"]) == [("xx", False), ("", True)]


@pytest.mark.parametrize(
    ("stops", "text", "expected"),
    [
        (("world", "lo"), "hello world", "hel"),      # "lo" starts first
        (("lo", "world"), "hello world", "hel"),      # whatever the order of the stops
        (("o w", "ld"), "hello world", "hell"),
        (("ab", "abc"), "xxabc", "xx"),               # same position: nothing is released
    ],
)
def test_first_match_by_position_wins(stops: tuple[str, ...], text: str, expected: str) -> None:
    assert StopStringMatcher(stops).feed(text) == (expected, True)


@SETTINGS
@given(
    st.text(alphabet="ab#", max_size=30),
    st.text(alphabet="ab#", min_size=1, max_size=4),
    st.data(),
)
def test_streaming_finds_the_first_occurrence_whatever_the_split(
    text: str, stop: str, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    matcher = StopStringMatcher((stop,))
    released = ""
    found = False
    for a, b in itertools.pairwise(bounds):
        piece, found = matcher.feed(text[a:b])
        released += piece
        if found:
            break
    if not found:
        released += matcher.flush()

    index = text.find(stop)
    assert found == (index >= 0)
    assert released == (text[:index] if index >= 0 else text)
