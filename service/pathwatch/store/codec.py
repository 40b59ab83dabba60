"""Byte encodings of stored keys and key records (format version 1).

Every RocksDB key starts with a one-byte keyspace tag (see ``keyspace.py``). Within the
first-seen keyspaces a process key tuple is encoded field by field as
``u16 big-endian byte length`` + UTF-8 bytes, so any string (even one holding NUL) round-trips and
tuples of equal field lengths sort field by field.

A key record (the value under ``R``) is, little-endian::

    u8  format version (1)
    u8  flags (0; reserved)
    u16 number of runs N
    i64 first_seen: Unix ms of the earliest observation ever stored
    i64 last_seen:  Unix ms of the latest observation
    N x (u32 start minute, u32 end minute exclusive)   -- the PresenceHistory runs

Version 2 is written only for a key that holds untrusted minutes (observed only by points that
arrived later than ``receiver.max_baseline_lateness`` after their timestamp): the same layout
with flags bit 0 set, followed by::

    u16 number of untrusted runs M
    M x (u32 start minute, u32 end minute exclusive)   -- minutes observed only late

Every other key keeps version 1 byte for byte. A reader that meets a version it does not know
raises ``RecordFormatError`` rather than guess; a later release migrates records by version
byte.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from pathwatch.store.presence import PresenceHistory

KeyTuple = tuple[str, ...]

NO_HISTORY = PresenceHistory()
RECORD_VERSION = 1
RECORD_VERSION_UNTRUSTED = 2
_FLAG_UNTRUSTED = 1
_HEADER = struct.Struct("<BBHqq")
_U16 = struct.Struct(">H")
MAX_FIELD_BYTES = 0xFFFF


class RecordFormatError(ValueError):
    """A stored value that this release cannot decode (corrupt, or written by a newer release)."""


@dataclass(frozen=True, slots=True)
class KeyState:
    """What the store knows about one key of one rule."""

    first_seen_ms: int
    last_seen_ms: int
    history: PresenceHistory
    # Minutes of `history` observed only by late points: they can make the key new but never
    # count as its baseline. A subset of `history`; empty for almost every key.
    untrusted: PresenceHistory = NO_HISTORY

    def trusted_observed(self, start: int, end: int) -> bool:
        """Observed in ``[start, end)`` by a point that arrived on time?"""
        return self.history.observed_outside(start, end, self.untrusted)


def encode_key(key: KeyTuple) -> bytes:
    raws = [value.encode("utf-8", "surrogatepass") for value in key]
    longest = max(map(len, raws), default=0)
    if longest > MAX_FIELD_BYTES:
        raise ValueError(f"key field of {longest} bytes exceeds {MAX_FIELD_BYTES}")
    return b"".join([_U16.pack(len(raw)) + raw for raw in raws])


def decode_key(raw: bytes) -> KeyTuple:
    out = []
    i = 0
    while i < len(raw):
        (n,) = _U16.unpack_from(raw, i)
        i += 2
        out.append(raw[i : i + n].decode("utf-8", "surrogatepass"))
        i += n
    return tuple(out)


_RUN = struct.Struct("<II")


def _pack_runs(runs: tuple[tuple[int, int], ...]) -> bytes:
    if len(runs) == 1:  # a running process: the common record
        return _RUN.pack(*runs[0])
    return struct.pack(f"<{2 * len(runs)}I", *itertools.chain.from_iterable(runs))


def encode_state(state: KeyState) -> bytes:
    runs = state.history.runs
    late = state.untrusted.runs
    if not late:
        header = _HEADER.pack(RECORD_VERSION, 0, len(runs), state.first_seen_ms, state.last_seen_ms)
        return header + _pack_runs(runs)
    header = _HEADER.pack(
        RECORD_VERSION_UNTRUSTED,
        _FLAG_UNTRUSTED,
        len(runs),
        state.first_seen_ms,
        state.last_seen_ms,
    )
    return header + _pack_runs(runs) + _U16_LE.pack(len(late)) + _pack_runs(late)


_FIRST_SEEN = struct.Struct("<q")
_U32_LE = struct.Struct("<I")


def plain_record_bounds(raw: bytes) -> tuple[int, int, int, int, int] | None:
    """(runs, first_seen, last_seen, first run's start, last run's end) of a version-1 record
    that is exactly what `encode_state` writes for a key without untrusted minutes, read
    without decoding it; None for any other value (the caller decodes those)."""
    if len(raw) < _HEADER.size + 8 or raw[0] != RECORD_VERSION or raw[1] != 0:
        return None
    _, _, n, first, last = _HEADER.unpack_from(raw)
    if n == 0 or len(raw) != _HEADER.size + 8 * n:
        return None
    (start,) = _U32_LE.unpack_from(raw, _HEADER.size)
    (end,) = _U32_LE.unpack_from(raw, len(raw) - 4)
    return n, first, last, start, end


def with_last_run_end(raw: bytes, end: int, last_seen_ms: int) -> bytes:
    """A record `plain_record_bounds` reads, its last run now ending at `end` and last_seen
    `last_seen_ms`: byte for byte what `encode_state` writes for that state."""
    return raw[:12] + _FIRST_SEEN.pack(last_seen_ms) + raw[_HEADER.size : -4] + _U32_LE.pack(end)


_U16_LE = struct.Struct("<H")
NO_TRUSTED_FIRST_SEEN = -1


def first_seen_of(raw: bytes) -> int:
    """first_seen of an encoded record, read from its header without decoding the rest.

    NO_TRUSTED_FIRST_SEEN for a record holding untrusted minutes: its first_seen may be a late
    point, which says nothing about its baseline, so callers must not skip it by first_seen."""
    if len(raw) >= _HEADER.size and raw[0] == RECORD_VERSION_UNTRUSTED:
        decode_state(raw)  # validates
        return NO_TRUSTED_FIRST_SEEN
    if len(raw) < _HEADER.size or raw[0] != RECORD_VERSION:
        return decode_state(raw).first_seen_ms  # raises RecordFormatError
    return int(_FIRST_SEEN.unpack_from(raw, 4)[0])


def decode_state(raw: bytes) -> KeyState:
    if len(raw) < _HEADER.size:
        raise RecordFormatError(f"key record of {len(raw)} bytes is shorter than its header")
    version, flags, n, first, last = _HEADER.unpack_from(raw)
    if version not in (RECORD_VERSION, RECORD_VERSION_UNTRUSTED):
        raise RecordFormatError(f"key record format version {version} is not supported")
    end = _HEADER.size + 8 * n
    if len(raw) < end:
        raise RecordFormatError("key record is truncated")
    runs = _unpack_runs(raw, _HEADER.size, n)
    if version == RECORD_VERSION or not flags & _FLAG_UNTRUSTED:
        return KeyState(first, last, PresenceHistory(runs))
    if len(raw) < end + 2:
        raise RecordFormatError("key record is truncated (untrusted runs)")
    (m,) = _U16_LE.unpack_from(raw, end)
    if len(raw) < end + 2 + 8 * m:
        raise RecordFormatError("key record is truncated (untrusted runs)")
    late = _unpack_runs(raw, end + 2, m)
    return KeyState(first, last, PresenceHistory(runs), PresenceHistory(late))


def _unpack_runs(raw: bytes, offset: int, n: int) -> tuple[tuple[int, int], ...]:
    if n == 1:
        return (_RUN.unpack_from(raw, offset),)
    flat = struct.unpack_from(f"<{2 * n}I", raw, offset)
    return tuple((flat[i], flat[i + 1]) for i in range(0, 2 * n, 2))
