"""Minute extensions: the blind write path for running processes at a minute boundary.

At the collector's 60 s interval every scrape of a running process brings a minute its key
does not hold yet, so without this every observation would be a record read-modify-write.
But a minute that directly follows the key's last stored minute, arriving on time from a key
with no untrusted minute, changes nothing that evaluation decides: it starts no run (so it is
no onset, no late onset and no stream alert) and the key was observed the minute before. What
the acknowledgement needs is the observation durable, not the record rewritten.

So such a minute is *logged*: the writer adds, to the group commit it fsyncs anyway, one entry
``W seq:u64be`` holding the request's timestamp and the keys it extends (compressed; format
in `encode_entry`),
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

import itertools
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence

from pathwatch.observations import RuleKey
from pathwatch.store.codec import decode_key, encode_key

LOG_PREFIX = b"W"
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_FORMAT_2 = b"\x01"  # log entry format (`encode_entry`); a zlib stream never starts with it


def log_key(seq: int) -> bytes:
    return LOG_PREFIX + _U64.pack(seq)


def item_of(rule_key: RuleKey) -> bytes:
    """A key as the log holds it (and DurableResources keeps it, and pending minutes are
    filed under it): 0x00 and the rule and fields joined by NUL (the common case), or, when a
    field holds a NUL itself, 0x01, the rule, NUL and the key's length-prefixed encoding."""
    rule, key = rule_key
    text = "\x00".join((rule, *key))
    if text.count("\x00") == len(key):
        return b"\x00" + text.encode("utf-8", "surrogatepass")
    return b"\x01" + rule.encode() + b"\x00" + encode_key(key)


def rule_key_of(item: bytes) -> RuleKey:
    if item[:1] == b"\x00":
        rule, *fields = item[1:].decode("utf-8", "surrogatepass").split("\x00")
        return rule, tuple(fields)
    rule_raw, _, encoded = item[1:].partition(b"\x00")
    return rule_raw.decode(), decode_key(encoded)


def rule_of(item: bytes) -> bytes:
    """The rule id of an item, as UTF-8 bytes."""
    return item[1 : item.index(b"\x00", 1)]


def encode_entry(time_ms: int, items: Sequence[bytes]) -> bytes:
    """One log entry: the observations' timestamp and the keys whose minute they extend.

    ``time:u64be 0x01 zlib(count:u32be len:u16be*count items...)``: the lengths in one array,
    so that both ends are a few C calls instead of a loop per key. Entries written before
    (``time:u64be zlib(len:u16be item ...)``, whose zlib stream starts with 0x78) still
    decode: a log left by the previous version is replayed after an upgrade."""
    n = len(items)
    body = _U32.pack(n) + struct.pack(f">{n}H", *map(len, items)) + b"".join(items)
    return _U64.pack(time_ms) + _FORMAT_2 + zlib.compress(body, 1)


def decode_entry(value: bytes) -> tuple[int, list[bytes]]:
    (time_ms,) = _U64.unpack_from(value)
    if value[8:9] != _FORMAT_2:
        return time_ms, _decode_entry_v1(zlib.decompress(value[8:]))
    body = zlib.decompress(value[9:])
    (n,) = _U32.unpack_from(body)
    lengths = struct.unpack_from(f">{n}H", body, 4)
    start = 4 + 2 * n
    if start + sum(lengths) != len(body):
        raise ValueError("log entry: lengths do not match the body")
    ends = list(itertools.accumulate(lengths, initial=start))
    return time_ms, [body[a:b] for a, b in itertools.pairwise(ends)]


def _decode_entry_v1(body: bytes) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while i < len(body):
        (n,) = _U16.unpack_from(body, i)
        out.append(body[i + 2 : i + 2 + n])
        i += 2 + n
    return out


class Pending:
    """A key's minutes awaiting the fold: the run ``[a, b]`` (inclusive) that the minutes of a
    running process make, any others in `more` (rare), and the earliest and latest timestamp
    that brought them. Small on purpose: one per live process between two folds."""

    __slots__ = ("a", "b", "first_ms", "last_ms", "more")

    def __init__(self, minute: int, time_ms: int) -> None:
        self.a = self.b = minute
        self.first_ms = self.last_ms = time_ms
        self.more: set[int] | None = None

    def minutes(self) -> Iterator[int]:
        yield from range(self.a, self.b + 1)
        if self.more:
            yield from self.more

    def add(self, minute: int, time_ms: int) -> None:
        if minute == self.b + 1:
            self.b = minute
        elif not self.a <= minute <= self.b:
            if self.more is None:
                self.more = set()
            self.more.add(minute)
        self.first_ms = min(self.first_ms, time_ms)
        self.last_ms = max(self.last_ms, time_ms)


class PendingExtensions:
    """Logged minutes not folded into their records yet, by key (`item_of`). Mutated by the writer
    thread only; `lookup` is safe from any thread (single dict reads, see the docstring)."""

    def __init__(self) -> None:
        self.fresh: dict[bytes, Pending] = {}
        self.cycle: dict[bytes, Pending] = {}
        self.inflight: dict[bytes, Pending] = {}
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

    def lookup(self, item: bytes) -> list[Pending]:
        """Every pending entry of the key (at most one per generation)."""
        out = []
        for gen in (self.fresh, self.cycle, self.inflight):
            p = gen.get(item)
            if p is not None:
                out.append(p)
        return out

    def add_many(self, items: Iterable[bytes], minute: int, time_ms: int) -> None:
        """Add `minute` (brought at `time_ms`) to each key: the writer's hot path, a node's
        whole scrape at once."""
        fresh = self.fresh
        n = 0
        for item in items:
            n += 1
            p = fresh.get(item)
            if p is None:
                fresh[item] = Pending(minute, time_ms)
            elif minute == p.b + 1:  # the common case: the next minute of a running process
                p.b = minute
                if time_ms > p.last_ms:  # noqa: PLR1730 (a comparison is cheaper than max())
                    p.last_ms = time_ms
            else:
                p.add(minute, time_ms)
        self.fresh_minutes += n

    def discard(self, items: Iterable[bytes]) -> None:
        """Forget keys whose pending minutes a commit just wrote into their records."""
        for item in items:
            self.fresh.pop(item, None)
            self.cycle.pop(item, None)
            self.inflight.pop(item, None)

    # -- folding (writer thread) ---------------------------------------------------------

    def start_cycle(self) -> None:
        """Fold everything pending so far: `fresh` becomes the cycle (called between cycles,
        when the cycle is empty)."""
        self.cycle, self.fresh = self.fresh, {}
        self.fresh_minutes = 0
        self.cycle_seq = self.seq

    def take(self, n: int) -> dict[bytes, Pending]:
        """Move up to `n` keys of the cycle to `inflight` and return them."""
        cycle = self.cycle
        chunk = {item: cycle[item] for item in itertools.islice(cycle, n)}
        for item in chunk:
            del cycle[item]
        self.inflight.update(chunk)
        return chunk

    def settle(self, folded: bool) -> None:
        """After a chunk's commit: forget it (folded) or put it back in the cycle (failed)."""
        if not folded:
            for item, p in self.inflight.items():
                self.cycle.setdefault(item, p)
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
            time_ms, items = decode_entry(value)
            self.add_many(items, time_ms // 60_000, time_ms)
            minutes += len(items)
        if self.fresh:
            self.start_cycle()
        return minutes
