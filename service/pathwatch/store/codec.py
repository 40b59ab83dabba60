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

A reader that meets a version it does not know raises ``RecordFormatError`` rather than guess;
a later release migrates records by version byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pathwatch.store.presence import PresenceHistory

KeyTuple = tuple[str, ...]

RECORD_VERSION = 1
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


def encode_key(key: KeyTuple) -> bytes:
    parts = []
    for value in key:
        raw = value.encode("utf-8", "surrogatepass")
        if len(raw) > MAX_FIELD_BYTES:
            raise ValueError(f"key field of {len(raw)} bytes exceeds {MAX_FIELD_BYTES}")
        parts.append(_U16.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def decode_key(raw: bytes) -> KeyTuple:
    out = []
    i = 0
    while i < len(raw):
        (n,) = _U16.unpack_from(raw, i)
        i += 2
        out.append(raw[i : i + n].decode("utf-8", "surrogatepass"))
        i += n
    return tuple(out)


def encode_state(state: KeyState) -> bytes:
    runs = state.history.runs
    header = _HEADER.pack(RECORD_VERSION, 0, len(runs), state.first_seen_ms, state.last_seen_ms)
    return header + struct.pack(f"<{2 * len(runs)}I", *(m for run in runs for m in run))


_FIRST_SEEN = struct.Struct("<q")


def first_seen_of(raw: bytes) -> int:
    """first_seen of an encoded record, read from its header without decoding the rest."""
    if len(raw) < _HEADER.size or raw[0] != RECORD_VERSION:
        return decode_state(raw).first_seen_ms  # raises RecordFormatError
    return int(_FIRST_SEEN.unpack_from(raw, 4)[0])


def decode_state(raw: bytes) -> KeyState:
    if len(raw) < _HEADER.size:
        raise RecordFormatError(f"key record of {len(raw)} bytes is shorter than its header")
    version, _flags, n, first, last = _HEADER.unpack_from(raw)
    if version != RECORD_VERSION:
        raise RecordFormatError(f"key record format version {version} is not supported")
    if len(raw) < _HEADER.size + 8 * n:
        raise RecordFormatError("key record is truncated")
    flat = struct.unpack_from(f"<{2 * n}I", raw, _HEADER.size)
    runs = tuple((flat[i], flat[i + 1]) for i in range(0, 2 * n, 2))
    return KeyState(first, last, PresenceHistory(runs))
