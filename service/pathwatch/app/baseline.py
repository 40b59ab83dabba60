"""Baseline files: first-seen state exported from one data dir and merged into another.

A baseline seeds a new installation (or a replacement) with what an old one learned, so its
rules do not start blind, and is a portable backup of detection state. Export and import open
RocksDB directly: run them on a stopped data dir.

Format, version 1, gzip-compressed as a whole::

    b"PATHWATCH-BASELINE 1\\n"
    records, each: u32be length N, then N bytes: u8 kind, then the kind's body
      kind 1, a key:  u16be length + rule id, u32be length + encoded key tuple (codec.encode_key),
                      then the key record itself (codec.encode_state, with its own version byte)
      kind 2, a row:  u16be length + RocksDB key of a first-seen row (``H`` host or cluster,
                      ``P`` / ``N`` context index), then u64be Unix ms
      kind 0, end:    u64be key records, u64be rows   (a file without it is truncated)

A reader skips kinds it does not know, so a later release may add kinds within version 1; a
change an older reader would misread gets a new version, which import refuses.

Import merges with the same result FirstSeenStore.apply gives for the same observations:
presence is the union of runs, trimmed to the rule's horizon and run cap; first_seen is the
minimum and last_seen the maximum; host, cluster and context first-seen rows keep the minimum.
Like apply, it writes an activity-index entry (valued with the merged first_seen) for each hour
of imported presence inside the index window that the key had no presence in, an expiry-index
entry when the last-seen day changes, and the rule's exact key count. Importing the same file
again changes nothing. Keys of rules missing from `retention`, and keys with no presence inside
the horizon, are skipped.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from pathwatch.clock import MINUTE_MS
from pathwatch.store import keyspace as ks
from pathwatch.store.codec import (
    KeyState,
    decode_key,
    decode_state,
    encode_key,
    encode_state,
)
from pathwatch.store.context import SEP_BYTES as CONTEXT_SEP
from pathwatch.store.db import Batch, Database
from pathwatch.store.firstseen import MINUTES_PER_DAY, MINUTES_PER_HOUR, Retention, index_writes
from pathwatch.store.presence import PresenceHistory, Run

MAGIC = b"PATHWATCH-BASELINE "
VERSION = 1
HEADER = MAGIC + str(VERSION).encode() + b"\n"
KIND_END, KIND_KEY, KIND_ROW = 0, 1, 2
ROW_TAGS = (b"H", b"P", b"N")  # first-seen rows: hosts and clusters, the context index
CHUNK = 10_000  # records merged per RocksDB write
MAX_FUTURE_MINUTES = MINUTES_PER_DAY  # imported presence further ahead of now is dropped
_LEN = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_END = struct.Struct(">BQQ")


def _record(kind: int, body: bytes) -> bytes:
    return _LEN.pack(1 + len(body)) + bytes([kind]) + body


@dataclass(frozen=True)
class ClusterScope:
    """Export one cluster only (moving it between shards): `positions` gives, per rule id,
    where k8s.cluster.name and host.name sit in its keys (host None when absent). Keys of
    rules without the cluster field, rows of other clusters and of hosts the cluster's keys
    never name, are left out."""

    cluster: str
    positions: Mapping[str, tuple[int, int | None]]


def export_baseline(
    db: Database, out: BinaryIO, rules: list[str], scope: ClusterScope | None = None
) -> int:
    """Write the key records of `rules` (every rule in the store when empty) and the
    first-seen rows to `out` (left open); with `scope`, only what belongs to that cluster.
    Returns the number of key records written."""
    keys = rows = 0
    hosts: set[str] = set()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(HEADER)
        prefixes = [ks.record_prefix(r) for r in rules] if rules else [b"R"]
        for prefix in prefixes:
            for raw, value in db.scan_prefix(prefix):
                rule, _, encoded = raw[1:].partition(b"\x00")
                if scope is not None:
                    where = scope.positions.get(rule.decode())
                    if where is None:
                        continue
                    key = decode_key(encoded)
                    if key[where[0]] != scope.cluster:
                        continue
                    if where[1] is not None:
                        hosts.add(key[where[1]])
                body = _U16.pack(len(rule)) + rule + _LEN.pack(len(encoded)) + encoded + value
                gz.write(_record(KIND_KEY, body))
                keys += 1
        for raw, value in _rows(db, scope, hosts):
            gz.write(_record(KIND_ROW, _U16.pack(len(raw)) + raw + value[:8]))
            rows += 1
        gz.write(_LEN.pack(_END.size) + _END.pack(KIND_END, keys, rows))
    return keys


def _rows(
    db: Database, scope: ClusterScope | None, hosts: set[str]
) -> Iterator[tuple[bytes, bytes]]:
    if scope is None:
        for tag in ROW_TAGS:
            yield from db.scan_prefix(tag)
        return
    cluster_row = ks.entity_key("c", scope.cluster)
    if (value := db.get(cluster_row)) is not None:
        yield cluster_row, value
    for host in sorted(hosts):
        host_row = ks.entity_key("h", host)
        if (value := db.get(host_row)) is not None:
            yield host_row, value
    own = scope.cluster.encode("utf-8", "surrogatepass") + CONTEXT_SEP
    for tag in (b"P", b"N"):
        yield from db.scan_prefix(tag + own)


def union_runs(*histories: tuple[Run, ...]) -> tuple[Run, ...]:
    """The runs covering every minute of the given run lists: sorted, merged where they
    overlap or touch, empty runs dropped (so a hand-made or corrupt list is made valid)."""
    out: list[Run] = []
    for start, end in sorted(r for runs in histories for r in runs if r[1] > r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return tuple(out)


def _clip(runs: tuple[Run, ...], lower: int, upper: int) -> tuple[Run, ...]:
    return tuple((max(s, lower), min(e, upper)) for s, e in runs if e > lower and s < upper)


def merge_state(
    old: KeyState | None, imported: KeyState, retention: Retention, now_ms: int
) -> KeyState | None:
    """The state after merging `imported` into `old` (see the module docstring), or None when
    `imported` has no presence inside the horizon (nothing to merge)."""
    now_min = now_ms // MINUTE_MS
    horizon = now_min - retention.horizon_minutes
    runs = _clip(union_runs(imported.history.runs), horizon, now_min + MAX_FUTURE_MINUTES + 1)
    if not runs:
        return None
    last_ms = min(imported.last_seen_ms, runs[-1][1] * MINUTE_MS - 1)
    first_ms = imported.first_seen_ms
    old_runs: tuple[Run, ...] = ()
    if old is not None:
        first_ms = min(first_ms, old.first_seen_ms)
        last_ms = max(last_ms, old.last_seen_ms)
        old_runs = old.history.runs
    history = PresenceHistory(union_runs(old_runs, runs)).trimmed(horizon, retention.max_runs)
    return KeyState(first_ms, last_ms, history)


def _new_hours(
    imported: KeyState, old: KeyState | None, retention: Retention, now_ms: int
) -> Iterator[int]:
    """Hours for activity-index entries, as FirstSeenStore.apply picks them: hours of imported
    presence inside the index window in which the key had no presence before."""
    now_min = now_ms // MINUTE_MS
    floor_hour = (now_min - retention.index_minutes) // MINUTES_PER_HOUR
    lower = max(now_min - retention.horizon_minutes, floor_hour * MINUTES_PER_HOUR)
    old_history = old.history if old is not None else PresenceHistory()
    runs = _clip(union_runs(imported.history.runs), lower, now_min + MAX_FUTURE_MINUTES + 1)
    seen: set[int] = set()
    for start, end in runs:
        for hour in range(start // MINUTES_PER_HOUR, (end - 1) // MINUTES_PER_HOUR + 1):
            if hour in seen:
                continue
            seen.add(hour)
            if not old_history.observed(hour * MINUTES_PER_HOUR, (hour + 1) * MINUTES_PER_HOUR):
                yield hour


class _Merger:
    """Buffers imported records and merges them into the store CHUNK at a time."""

    def __init__(self, db: Database, retention: Mapping[str, Retention], now_ms: int) -> None:
        self._db = db
        self._retention = retention
        self._now_ms = now_ms
        self._keys: list[tuple[str, bytes, KeyState]] = []
        self._rows: dict[bytes, int] = {}
        self._counts: dict[str, int] = {}
        self.merged = 0

    def add_key(self, rule: str, encoded: bytes, state: KeyState) -> None:
        if rule in self._retention:
            self._keys.append((rule, encoded, state))
            if len(self._keys) >= CHUNK:
                self.flush()

    def add_row(self, key: bytes, first_ms: int) -> None:
        known = self._rows.get(key)
        self._rows[key] = first_ms if known is None else min(known, first_ms)
        if len(self._rows) >= CHUNK:
            self.flush()

    def _count(self, rule: str) -> int:
        count = self._counts.get(rule)
        if count is None:
            raw = self._db.get(ks.meta_key(f"keys:{rule}"))
            count = self._counts[rule] = int(raw) if raw else 0
        return count

    def flush(self) -> None:
        wb = Batch()
        created: dict[str, int] = {}
        rkeys = [ks.record_key(rule, encoded) for rule, encoded, _ in self._keys]
        stored = dict(zip(rkeys, self._db.get_many(rkeys), strict=True))
        written: dict[bytes, KeyState] = {}  # a key twice in one chunk sees its first merge
        for (rule, encoded, imported), rkey in zip(self._keys, rkeys, strict=True):
            retention = self._retention[rule]
            old = written.get(rkey)
            if old is None and (raw := stored.get(rkey)) is not None:
                old = decode_state(raw)
            state = merge_state(old, imported, retention, self._now_ms)
            if state is None:
                continue
            self.merged += 1
            if state == old:
                continue
            wb.put(rkey, encode_state(state))
            for hour in _new_hours(imported, old, retention, self._now_ms):
                # As apply: the value is first_seen at write time, a real observation.
                wb.put(ks.activity_key(rule, hour, encoded), ks.u64(state.first_seen_ms))
            index_writes(wb, rule, encoded, old, state, retention, self._now_ms // MINUTE_MS)
            if old is None:
                created[rule] = created.get(rule, 0) + 1
            written[rkey] = state
        rows = list(self._rows.items())
        for (key, first_ms), raw in zip(rows, self._db.get_many([k for k, _ in rows]), strict=True):
            if raw is None or first_ms < ks.from_u64(raw):
                wb.put(key, ks.u64(first_ms))
        counts = {rule: self._count(rule) + n for rule, n in created.items()}
        for rule, count in counts.items():
            wb.put(ks.meta_key(f"keys:{rule}"), str(count).encode())
        self._db.commit(wb)
        self._counts.update(counts)
        self._keys, self._rows = [], {}


def _read_exact(stream: gzip.GzipFile, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise ValueError("baseline file is truncated")
    return data


def _records(stream: gzip.GzipFile) -> Iterator[tuple[int, bytes]]:
    while True:
        head = stream.read(_LEN.size)
        if not head:
            return
        if len(head) < _LEN.size:
            raise ValueError("baseline file is truncated")
        (length,) = _LEN.unpack(head)
        if length < 1 or length > 1 << 30:
            raise ValueError(f"baseline file is corrupt: a record of {length} bytes")
        record = stream.read(length)
        if len(record) < length:
            raise ValueError("baseline file is truncated")
        yield record[0], record[1:]


def import_baseline(
    db: Database, inp: BinaryIO, retention: Mapping[str, Retention], now_ms: int
) -> int:
    """Merge the baseline in `inp` into `db` (see the module docstring). Returns the number
    of keys merged. Raises ValueError for a file that is not a pathwatch baseline, has another
    version, or is truncated or corrupt; the records before a defect are merged all the same
    (importing the complete file afterwards is enough). StoreError when a write fails."""
    merger = _Merger(db, retention, now_ms)
    try:
        with gzip.GzipFile(fileobj=inp, mode="rb") as stream:
            _check_header(stream.readline(64))
            for kind, body in _records(stream):
                if kind == KIND_KEY:
                    merger.add_key(*_parse_key(body))
                elif kind == KIND_ROW:
                    merger.add_row(*_parse_row(body))
                elif kind == KIND_END:
                    merger.flush()
                    return merger.merged
        raise ValueError("baseline file is truncated (no end record)")
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        merger.flush()
        raise ValueError(f"not a pathwatch baseline file, or a damaged one: {exc}") from exc
    except ValueError:
        merger.flush()
        raise


def _check_header(header: bytes) -> None:
    if not header.startswith(MAGIC) or not header.endswith(b"\n"):
        raise ValueError("not a pathwatch baseline file (wrong header)")
    version = header[len(MAGIC) : -1].decode("ascii", "replace")
    if version != str(VERSION):
        raise ValueError(
            f"baseline format version {version} is not supported "
            f"(this release reads version {VERSION})"
        )


def _parse_key(body: bytes) -> tuple[str, bytes, KeyState]:
    try:
        (n,) = _U16.unpack_from(body)
        rule = body[2 : 2 + n].decode()
        (m,) = _LEN.unpack_from(body, 2 + n)
        encoded = body[6 + n : 6 + n + m]
        state = decode_state(body[6 + n + m :])
        valid = len(encoded) == m and encode_key(decode_key(encoded)) == encoded
    except (struct.error, ValueError) as exc:  # RecordFormatError, UnicodeDecodeError
        raise ValueError(f"baseline file is corrupt: a key record: {exc}") from exc
    if not valid or not rule or "\x00" in rule:
        raise ValueError("baseline file is corrupt: a key record with a malformed rule or key")
    return rule, encoded, state


def _parse_row(body: bytes) -> tuple[bytes, int]:
    try:
        (n,) = _U16.unpack_from(body)
        key = body[2 : 2 + n]
        (first_ms,) = _U64.unpack_from(body, 2 + n)
    except struct.error as exc:
        raise ValueError(f"baseline file is corrupt: a first-seen row: {exc}") from exc
    if len(key) != n or key[:1] not in ROW_TAGS:
        raise ValueError("baseline file is corrupt: a first-seen row outside H, P and N")
    return key, int(first_ms)
