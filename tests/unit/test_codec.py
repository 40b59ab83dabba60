"""Stored key and record encodings: lossless round trips and loud failures on bad records."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pathwatch.store.codec import (
    MAX_FIELD_BYTES,
    RECORD_VERSION,
    KeyState,
    RecordFormatError,
    decode_key,
    decode_state,
    encode_key,
    encode_state,
)
from pathwatch.store.presence import PresenceHistory

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=300)

# Any code point, lone surrogates included (the codec uses surrogatepass), NUL and non-BMP.
any_char = st.characters(exclude_categories=(), include_characters="\x00\U0001f600\U0010ffff")
key_tuples = st.lists(st.text(any_char, max_size=20), max_size=7).map(tuple)


@SETTINGS
@given(key_tuples)
@example(("",))
@example(("\x00", "a\x00b", "\x00\x00"))
@example(("\U0001f600", "\U0010ffff", "caf\u00e9", "\ud800"))
@example(("host-1", "prod", "node-1", "4242", "/usr/bin/python3", "python3"))
def test_key_roundtrip(key: tuple[str, ...]) -> None:
    """Every key tuple, even one holding NUL or emoji, is stored and read back unchanged."""
    assert decode_key(encode_key(key)) == key


@SETTINGS
@given(key_tuples, key_tuples)
def test_distinct_keys_encode_distinctly(a: tuple[str, ...], b: tuple[str, ...]) -> None:
    """Two different processes never share a stored key."""
    if a != b:
        assert encode_key(a) != encode_key(b)


def test_key_field_too_long_is_refused() -> None:
    """A key field over 64 KiB is refused instead of being silently corrupted."""
    assert decode_key(encode_key(("x" * MAX_FIELD_BYTES,))) == ("x" * MAX_FIELD_BYTES,)
    with pytest.raises(ValueError, match="exceeds"):
        encode_key(("x" * (MAX_FIELD_BYTES + 1),))


u32_minutes = st.lists(st.integers(0, 2**32 - 2), max_size=40)
i64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def key_states(draw: st.DrawFn) -> KeyState:
    history = PresenceHistory.of_minutes(draw(u32_minutes))
    return KeyState(draw(i64), draw(i64), history)


@SETTINGS
@given(key_states())
@example(KeyState(0, 0, PresenceHistory()))
@example(KeyState(-1, 2**63 - 1, PresenceHistory(((0, 1), (2**32 - 2, 2**32 - 1)))))
def test_state_roundtrip(state: KeyState) -> None:
    """A key's first/last seen times and presence history survive storage exactly."""
    assert decode_state(encode_state(state)) == state


def _sample() -> bytes:
    state = KeyState(1_700_000_000_123, 1_700_000_999_999, PresenceHistory(((10, 20), (30, 31))))
    return encode_state(state)


def test_header_layout_is_the_documented_one() -> None:
    """The record starts with version 1, flags 0, the run count and both times, little-endian."""
    raw = _sample()
    version, flags, n, first, last = struct.unpack_from("<BBHqq", raw)
    assert (version, flags, n, first, last) == (
        RECORD_VERSION,
        0,
        2,
        1_700_000_000_123,
        1_700_000_999_999,
    )
    assert struct.unpack_from("<4I", raw, 20) == (10, 20, 30, 31)
    assert len(raw) == 20 + 2 * 8


@pytest.mark.parametrize("version", [0, 3, 255])
def test_unknown_version_is_refused(version: int) -> None:
    """A record written by another format version is refused, not misread."""
    raw = bytes([version]) + _sample()[1:]
    with pytest.raises(RecordFormatError, match="version"):
        decode_state(raw)


def test_every_truncation_is_refused() -> None:
    """A record cut short at any byte is reported as a format error, not misread or crashed on."""
    raw = _sample()
    for cut in range(len(raw)):
        with pytest.raises(RecordFormatError):
            decode_state(raw[:cut])


def test_untrusted_minutes_round_trip_as_version_2() -> None:
    """A key holding minutes observed only late is written as version 2 with its untrusted
    runs after the history; every other key keeps version 1 byte for byte."""
    state = KeyState(
        1_700_000_000_000,
        1_700_000_500_000,
        PresenceHistory(((10, 20), (30, 31))),
        PresenceHistory(((10, 12),)),
    )
    raw = encode_state(state)
    assert raw[0] == 2
    assert decode_state(raw) == state
    assert encode_state(KeyState(1, 2, state.history))[0] == 1
    for cut in range(len(raw)):
        with pytest.raises(RecordFormatError):
            decode_state(raw[:cut])


def test_trusted_observed_ignores_untrusted_minutes() -> None:
    """Only minutes observed on time count as baseline."""
    state = KeyState(0, 0, PresenceHistory(((10, 20),)), PresenceHistory(((10, 15),)))
    assert not state.trusted_observed(0, 15)
    assert state.trusted_observed(0, 16)
    assert not state.trusted_observed(20, 30)
