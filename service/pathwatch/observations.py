"""Observation: what the receiver hands to the store, keyed by (rule id, key tuple)."""

from __future__ import annotations

from dataclasses import dataclass, field

KeyTuple = tuple[str, ...]
RuleKey = tuple[str, KeyTuple]


@dataclass(slots=True)
class Sighting:
    """All observations of one key in one batch: the distinct minutes and the exact extremes."""

    minutes: set[int] = field(default_factory=set)
    first_ms: int = 1 << 62
    last_ms: int = -1

    def add(self, time_ms: int) -> None:
        self.minutes.add(time_ms // 60_000)
        self.first_ms = min(self.first_ms, time_ms)
        self.last_ms = max(self.last_ms, time_ms)

    def absorb(self, other: Sighting) -> None:
        self.minutes |= other.minutes
        self.first_ms = min(self.first_ms, other.first_ms)
        self.last_ms = max(self.last_ms, other.last_ms)


ObservationBatch = dict[RuleKey, Sighting]
"""Observations grouped by key; `len` of a Sighting's minutes is the write work it causes."""


def merge_into(target: ObservationBatch, source: ObservationBatch) -> None:
    for rk, sighting in source.items():
        existing = target.get(rk)
        if existing is None:
            target[rk] = Sighting(set(sighting.minutes), sighting.first_ms, sighting.last_ms)
        else:
            existing.absorb(sighting)


@dataclass(frozen=True, slots=True)
class Mark:
    """A resource (by `fingerprint`, the hash of its Resource bytes) whose accepted points in
    one request all fell in `minute`, the earliest at `earliest_ms`, stored under `keys` (empty:
    it yields no key). Once durable it goes to the store's DurableResources."""

    fingerprint: int
    minute: int
    earliest_ms: int
    keys: tuple[RuleKey, ...]


@dataclass(frozen=True, slots=True)
class Extension:
    """Resources of one request whose points all carry `time_ms`, each (by fingerprint, with
    its keys, encoded as the extension log holds them: store/extend.py `item_of`) durable for
    the minute before it: the store may log their new minute instead of rewriting their
    records. Found by the receiver's fast path."""

    time_ms: int
    resources: tuple[tuple[int, tuple[bytes, ...]], ...]

    def __len__(self) -> int:
        return sum(len(keys) for _, keys in self.resources)
