"""DurableResources: resources whose observations in their latest minute are already stored.

A process is scraped every 10 s and its Resource bytes repeat; five scrapes in six fall in a
minute its key already has. The receiver looks a request's resources up here (by a hash of
their bytes) and, when all of them are known for the request's one minute, acknowledges it
without decoding a key or queueing a write. The writer adds entries only after the commit that
made them durable, from the key states it just wrote or read, so an entry never claims more
than the store holds.

At a minute boundary (the collector's 60 s interval: every scrape), a resource durable for
the minute just before the request's is an *extension*: its keys (kept with the entry) are
handed to the store, which logs the new minute instead of rewriting records (store/extend.py).

Value per resource: ``floor_ms * 2 + tracked``. Points at or after `floor_ms` and inside its
minute add nothing (`floor_ms` is the minute's start, or the key's first_seen when that falls
inside the minute, so an earlier point still moves first_seen). `tracked` tells whether the
resource yields a key for some rule (for the ingest counters).

The fast path counts a request's points as accepted and its Resources as tracked or untracked
by their entries. A ResourceMetrics without a Resource or without data points stores nothing on
either path, but the full path also counts it (untracked, ignored) and the fast path does not.

Bounded: past `capacity` entries the oldest half is forgotten; a forgotten resource costs one
pass through the full path. Reads from receiver threads and writes from the writer thread are
single dict operations (atomic in CPython).
"""

from __future__ import annotations

from collections.abc import Iterable

from pathwatch.clock import MINUTE_MS

# fingerprint, value, the resource's keys as the extension log holds them (extend.item_of)
Entry = tuple[int, int, tuple[bytes, ...]]


class DurableResources:
    def __init__(self, capacity: int) -> None:
        self._entries: dict[int, int] = {}
        self._keys: dict[int, tuple[bytes, ...]] = {}
        self._capacity = max(0, capacity)
        self.get = self._entries.get
        self.keys_of = self._keys.get

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> dict[int, int]:
        """fingerprint -> value: for the receiver's C loop (_wirescan.c), which reads it
        holding the GIL. Not to be mutated outside `add` and `clear`."""
        return self._entries

    @property
    def kept_keys(self) -> dict[int, tuple[bytes, ...]]:
        """fingerprint -> the resource's keys (`keys_of`), for the same loop."""
        return self._keys

    def add(self, entries: Iterable[Entry]) -> None:
        if self._capacity == 0:
            return
        data = self._entries
        keys_of = self._keys
        for fingerprint, value, keys in entries:
            data.pop(fingerprint, None)  # refreshed entries move to the young end
            data[fingerprint] = value
            if keys:
                keys_of[fingerprint] = keys
        if len(data) > self._capacity:
            for stale in list(data)[: len(data) - self._capacity // 2]:
                data.pop(stale, None)
                keys_of.pop(stale, None)

    def refresh(self, fingerprints: Iterable[int], value: int) -> None:
        """`add` of ``(fingerprint, value, ())`` for each: the keys kept for them stay. The
        writer's (and a receiver worker's) hot path at a minute boundary: every extension
        resource of a request gets the same value, the start of its new minute."""
        if self._capacity == 0:
            return
        data = self._entries
        for fingerprint in fingerprints:
            data.pop(fingerprint, None)  # refreshed entries move to the young end
            data[fingerprint] = value
        if len(data) > self._capacity:
            self.add(())

    def clear(self) -> None:
        self._entries.clear()
        self._keys.clear()


def encode(floor_ms: int, tracked: bool) -> int:
    return floor_ms * 2 + (1 if tracked else 0)


def covers(value: int, minute: int, earliest_ms: int) -> bool:
    """Does the entry `value` cover points from `earliest_ms` on, all inside `minute`?"""
    floor_ms = value >> 1
    return floor_ms // MINUTE_MS == minute and floor_ms <= earliest_ms
