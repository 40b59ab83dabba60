"""The layout of pathwatch's single RocksDB keyspace: one tag byte per kind of record.

- ``R rule 0x00 key`` -> key record (codec.py)
- ``A rule 0x00 hour:u32be key`` -> empty: key active in that hour (activity index)
- ``E rule 0x00 day:u32be key`` -> empty: key last seen on that day (expiry index)
- ``G rule 0x00 minute:u32be key`` -> empty: a run of the key starts there after a long gap
  (onset index)
- ``T rule 0x00 tick-minute:u32be`` -> tick record, JSON
- ``L time-ms:u64be alert-id`` -> risk event, JSON (the alert log)
- ``O sink 0x00 seq:u64be`` -> delivery record, JSON (the outbox)
- ``D sink 0x00 seq:u64be`` -> dead letter, JSON
- ``H kind 0x00 name`` -> u64be ms: first observation of a host (kind ``h``) or cluster (``c``)
- ``I alert-id`` -> u64be ms: the alert exists (deduplication across stream and schedule)
- ``S rule 0x00 suppression-key`` -> u64be ms: the last alert for it (suppress_for)
- ``Z rule 0x00 key`` -> u32be earliest late minute + u64be write sequence: the key got
  minutes inside windows of ticks that had already run; the next tick checks it again and
  deletes the entry (late data is never lost)
- ``F rule 0x00 hour:u32be key`` -> JSON {sender, host, first_ms}: a new key a new-key cap
  refused; the next tick lists it in a summary alert and deletes the entry
- ``Q rule 0x00 key`` -> JSON {reason, at_ms, record (hex)}: a key record that could not be
  read, set aside; the key starts a new history (so it can alert again, never stay hidden)
- ``C kind ...`` -> exact context counts for ``P`` / ``N`` (context.py), written with them
- ``W seq:u64be`` -> logged minutes: timestamp + compressed keys (extend.py), deleted once
  folded into their ``R`` records
- ``M name`` -> metadata (first start, sequence numbers, per rule ``keys:``, ``onsets:``,
  ``rule-seen:``; ``context:counted``)

Every tag has an owner and an expiry: the table is ``sweep.OWNERS`` (and docs/storage.md).

Rule ids and sink names never contain NUL (config validation), so ``tag name 0x00`` is a prefix
that no other rule or sink shares. Big-endian integers keep time order equal to byte order.
"""

from __future__ import annotations

import struct

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def _scoped(tag: bytes, name: str) -> bytes:
    return tag + name.encode() + b"\x00"


def record_key(rule: str, key: bytes) -> bytes:
    return _scoped(b"R", rule) + key


def record_prefix(rule: str) -> bytes:
    return _scoped(b"R", rule)


def activity_key(rule: str, hour: int, key: bytes) -> bytes:
    return _scoped(b"A", rule) + _U32.pack(hour) + key


def activity_bound(rule: str, hour: int) -> bytes:
    return _scoped(b"A", rule) + _U32.pack(hour)


def expiry_key(rule: str, day: int, key: bytes) -> bytes:
    return _scoped(b"E", rule) + _U32.pack(day) + key


def expiry_bound(rule: str, day: int) -> bytes:
    return _scoped(b"E", rule) + _U32.pack(day)


def onset_key(rule: str, minute: int, key: bytes) -> bytes:
    return _scoped(b"G", rule) + _U32.pack(minute) + key


def onset_bound(rule: str, minute: int) -> bytes:
    return _scoped(b"G", rule) + _U32.pack(max(0, minute))


def split_indexed(prefix_len: int, raw: bytes) -> tuple[int, bytes]:
    """Split an ``A``, ``E`` or ``G`` key into (bucket, encoded key tuple)."""
    (bucket,) = _U32.unpack_from(raw, prefix_len)
    return bucket, raw[prefix_len + 4 :]


def tick_key(rule: str, tick_minute: int) -> bytes:
    return _scoped(b"T", rule) + _U32.pack(tick_minute)


def tick_prefix(rule: str) -> bytes:
    return _scoped(b"T", rule)


def alert_key(time_ms: int, alert_id: str) -> bytes:
    return b"L" + _U64.pack(time_ms) + alert_id.encode()


def alert_bound(time_ms: int) -> bytes:
    return b"L" + _U64.pack(max(0, time_ms))


def outbox_key(sink: str, seq: int) -> bytes:
    return _scoped(b"O", sink) + _U64.pack(seq)


def outbox_prefix(sink: str) -> bytes:
    return _scoped(b"O", sink)


def deadletter_key(sink: str, seq: int) -> bytes:
    return _scoped(b"D", sink) + _U64.pack(seq)


def deadletter_prefix(sink: str) -> bytes:
    return _scoped(b"D", sink)


def seq_of(raw: bytes) -> int:
    """The sequence number at the end of an ``O`` or ``D`` key."""
    (seq,) = _U64.unpack_from(raw, len(raw) - 8)
    return int(seq)


def meta_key(name: str) -> bytes:
    return b"M" + name.encode()


def prefix_end(prefix: bytes) -> bytes:
    """The smallest byte string greater than every string that starts with `prefix`."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\xff" * (len(prefix) + 1)
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def entity_key(kind: str, name: str) -> bytes:
    return _scoped(b"H", kind) + name.encode("utf-8", "surrogatepass")


def alert_id_key(alert_id: str) -> bytes:
    return b"I" + alert_id.encode()


def suppression_key(rule: str, key: bytes) -> bytes:
    return _scoped(b"S", rule) + key


def u64(value: int) -> bytes:
    return _U64.pack(max(0, value))


def from_u64(raw: bytes) -> int:
    (value,) = _U64.unpack(raw[:8])
    return int(value)


def late_key(rule: str, key: bytes) -> bytes:
    return _scoped(b"Z", rule) + key


def late_prefix(rule: str) -> bytes:
    return _scoped(b"Z", rule)


_LATE = struct.Struct(">IQ")


def late_value(minute: int, seq: int) -> bytes:
    return _LATE.pack(max(0, minute), seq)


def late_minute(raw: bytes) -> int:
    return int(_LATE.unpack(raw[: _LATE.size])[0])


def refused_key(rule: str, hour: int, key: bytes) -> bytes:
    return _scoped(b"F", rule) + _U32.pack(hour) + key


def refused_prefix(rule: str) -> bytes:
    return _scoped(b"F", rule)


def quarantine_key(rule: str, key: bytes) -> bytes:
    return _scoped(b"Q", rule) + key


QUARANTINE_PREFIX = b"Q"
