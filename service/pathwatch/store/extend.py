"""Minute extensions: the blind write path for running processes at a minute boundary.

At the collector's 60 s interval every scrape of a running process brings a minute its key
does not hold yet, so without this every observation would be a record read-modify-write.
But a minute that directly follows the key's last stored minute, arriving on time from a key
with no untrusted minute, changes nothing that evaluation decides: it starts no run (so it is
no onset, no late onset and no stream alert) and the key was observed the minute before. What
the acknowledgement needs is the observation durable, not the record rewritten.

So such a minute is *logged*: the writer adds, to the group commit it fsyncs anyway, one entry
``W seq:u64be`` holding the request's timestamp and the keys it extends (compressed),
and keeps the extension in memory here (`PendingExtensions`). Readers of key records
(evaluation, inspect, the console) overlay it, so every read sees the same state as if the
record had been rewritten. Every `fold_interval` the writer folds what is pending into the
records in chunks between group commits (one read-modify-write per key for all its pending
minutes: at 60 s, one instead of ten with a 10-minute interval), then deletes the log entries
the fold covered. A key that takes the full path meanwhile has its pending minutes merged into
that same write. After a crash, `load` reads the log back into memory before the writer takes
any write: no acknowledged minute is lost.

Generations: extensions go to `fresh`. A fold starts by making `fresh` the `cycle` and
remembering the last log sequence written; it moves chunks of `cycle` to `inflight`, commits
them, and forgets them; when `cycle` and `inflight` are empty, every log entry up to that
sequence is folded and is deleted. Readers on any thread look a key up in `fresh`, then
`cycle`, then `inflight` (entries only move in that direction), before reading the record, so
a reader never misses a minute that is neither in memory nor in the record.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pathwatch.observations import RuleKey
from pathwatch.store.codec import decode_key, encode_key

LOG_PREFIX = b"W"
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


def log_key(seq: int) -> bytes:
    return LOG_PREFIX + _U64.pack(seq)


def _item(rule_key: RuleKey) -> bytes:
    """A key in a log entry: 0x00 and the rule and fields joined by NUL (the fast common case)
    or, when a field holds a NUL itself, 0x01 and the record key's length-prefixed encoding."""
    rule, key = rule_key
    text = "\x00".join((rule, *key))
    if text.count("\x00") == len(key):
        return b"\x00" + text.encode("utf-8", "surrogatepass")
    return b"\x01" + rule.encode() + b"\x00" + encode_key(key)


def _rule_key(item: bytes) -> RuleKey:
    if item[:1] == b"\x00":
        rule, *fields = item[1:].decode("utf-8", "surrogatepass").split("\x00")
        return rule, tuple(fields)
    rule_raw, _, encoded = item[1:].partition(b"\x00")
    return rule_raw.decode(), decode_key(encoded)


def encode_entry(time_ms: int, rule_keys: Iterable[RuleKey]) -> bytes:
    """One log entry: the observations' timestamp and the keys whose minute they extend."""
    body = b"".join(_U16.pack(len(item)) + item for item in map(_item, rule_keys))
    return _U64.pack(time_ms) + zlib.compress(body, 1)


def decode_entry(value: bytes) -> tuple[int, list[RuleKey]]:
    (time_ms,) = _U64.unpack_from(value)
    body = zlib.decompress(value[8:])
    out: list[RuleKey] = []
    i = 0
    while i < len(body):
        (n,) = _U16.unpack_from(body, i)
        out.append(_rule_key(body[i + 2 : i + 2 + n]))
        i += 2 + n
    return time_ms, out


@dataclass(slots=True)
class Pending:
    """A key's minutes awaiting the fold: the runs `runs` (inclusive minute ranges, ordered),
    the earliest and latest timestamp that brought them."""

    rule_key: RuleKey
    runs: list[list[int]]
    first_ms: int
    last_ms: int

    def minutes(self) -> Iterator[int]:
        for a, b in self.runs:
            yield from range(a, b + 1)

    def add(self, minute: int, time_ms: int) -> None:
        last = self.runs[-1]
        if minute == last[1] + 1:
            last[1] = minute
        elif minute > last[1]:
            self.runs.append([minute, minute])
        elif not any(a <= minute <= b for a, b in self.runs):
            self.runs.append([minute, minute])
            self.runs.sort()
        self.first_ms = min(self.first_ms, time_ms)
        self.last_ms = max(self.last_ms, time_ms)


class PendingExtensions:
    """Logged minutes not folded into their records yet, by (rule, key). Mutated by the writer
    thread only; `lookup` is safe from any thread (single dict reads, see the docstring)."""

    def __init__(self) -> None:
        self.fresh: dict[RuleKey, Pending] = {}
        self.cycle: dict[RuleKey, Pending] = {}
        self.inflight: dict[RuleKey, Pending] = {}
        self.seq = 0  # the last log sequence written
        self.cleared = 0  # log entries up to this sequence are deleted
        self.cycle_seq = -1  # log entries up to this one are folded once the cycle is done
        self.fresh_minutes = 0  # minutes logged into `fresh` since the last cycle started

    def __len__(self) -> int:
        return len(self.fresh) + len(self.cycle) + len(self.inflight)

    @property
    def unfolded(self) -> bool:
        """Minutes in memory, or log entries not deleted yet: a fold has work to do."""
        return bool(len(self)) or self.seq > self.cleared

    @property
    def folding(self) -> bool:
        return self.cycle_seq >= 0

    def lookup(self, rule_key: RuleKey) -> list[Pending]:
        """Every pending entry of the key (at most one per generation)."""
        out = []
        for gen in (self.fresh, self.cycle, self.inflight):
            p = gen.get(rule_key)
            if p is not None:
                out.append(p)
        return out

    def add_many(self, rule_keys: Iterable[RuleKey], minute: int, time_ms: int) -> None:
        """`add` for many keys at once (the writer's hot path: a node's whole scrape)."""
        fresh = self.fresh
        n = 0
        for rk in rule_keys:
            n += 1
            p = fresh.get(rk)
            if p is None:
                fresh[rk] = Pending(rk, [[minute, minute]], time_ms, time_ms)
                continue
            last = p.runs[-1]
            if minute == last[1] + 1:  # the common case: the next minute of a running process
                last[1] = minute
                p.last_ms = max(p.last_ms, time_ms)
            else:
                p.add(minute, time_ms)
        self.fresh_minutes += n

    def discard(self, rule_keys: Iterable[RuleKey]) -> None:
        """Forget keys whose pending minutes a commit just wrote into their records."""
        for rk in rule_keys:
            self.fresh.pop(rk, None)
            self.cycle.pop(rk, None)
            self.inflight.pop(rk, None)

    # -- folding (writer thread) ---------------------------------------------------------

    def start_cycle(self) -> None:
        """Fold everything pending so far: `fresh` becomes the cycle (called between cycles,
        when the cycle is empty)."""
        self.cycle, self.fresh = self.fresh, {}
        self.fresh_minutes = 0
        self.cycle_seq = self.seq

    def take(self, n: int) -> dict[RuleKey, Pending]:
        """Move up to `n` keys of the cycle to `inflight` and return them."""
        chunk: dict[RuleKey, Pending] = {}
        for rk in list(self.cycle)[:n]:
            chunk[rk] = self.inflight[rk] = self.cycle[rk]
            del self.cycle[rk]
        return chunk

    def settle(self, folded: bool) -> None:
        """After a chunk's commit: forget it (folded) or put it back in the cycle (failed)."""
        if not folded:
            for rk, p in self.inflight.items():
                self.cycle.setdefault(rk, p)
        self.inflight = {}

    def cycle_done(self) -> int | None:
        """The last log sequence the finished cycle covered, once nothing is left to fold."""
        if self.cycle_seq < 0 or self.cycle or self.inflight:
            return None
        done, self.cycle_seq = self.cycle_seq, -1
        self.cleared = max(self.cleared, done)
        return done

    # -- recovery ------------------------------------------------------------------------

    def load(self, entries: Iterable[tuple[bytes, bytes]]) -> int:
        """Read log entries (RocksDB key, value) back into memory after a restart, as the
        cycle to fold first; returns how many minutes they held. Call before any write."""
        minutes = 0
        for raw_key, value in entries:
            (seq,) = _U64.unpack_from(raw_key, 1)
            self.seq = max(self.seq, seq)
            time_ms, rule_keys = decode_entry(value)
            self.add_many(rule_keys, time_ms // 60_000, time_ms)
            minutes += len(rule_keys)
        if self.fresh:
            self.start_cycle()
        return minutes
