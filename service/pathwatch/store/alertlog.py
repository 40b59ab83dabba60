"""AlertStore: tick records, the alert log, the per-sink outbox and dead letters, in RocksDB.

`commit_tick` writes a tick's record, its alerts and one delivery record per sink in one atomic
batch, so after a crash either the whole evaluation is there (and is delivered) or none of it is
(and the tick runs again, producing the same alert ids). A delivery record is deleted only after
its sink acknowledged it (`ack`), or moved to the dead letters in the same write.

Each sink's outbox depth is a counter: counted by one scan of the outbox at first use (so a
restart, kill -9 included, starts from the exact figure), then kept by every write here that adds
or removes an outbox record. A write that fails may still apply later (see `Database.commit`), so
after one the counters are recounted once a write has succeeded again.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pathwatch.store import keyspace as ks
from pathwatch.store.db import Batch, Database, StoreError

_SEQ_KEY = ks.meta_key("seq")
_OUTBOX_TAG = ks.outbox_prefix("")[:1]
_DEADLETTER_TAG = ks.deadletter_prefix("")[:1]


@dataclass(frozen=True, slots=True)
class TickRecord:
    rule_id: str
    tick_ms: int
    alert_ids: tuple[str, ...]
    evaluated_ms: int
    excluded: int = 0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One alert waiting for one sink. `record` is the stored JSON object."""

    sink: str
    seq: int
    record: dict[str, Any]

    @property
    def alert_id(self) -> str:
        return str(self.record["alert_id"])

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = self.record["event"]
        return event


class AlertStore:
    """Thread-safe; writers serialise on an internal lock (sequence numbers, tick idempotency)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # Serialises sequence numbers, tick idempotency and every outbox write with the depth
        # counters, so a counter always matches the writes that went through.
        self._lock = threading.Lock()
        raw = db.get(_SEQ_KEY)
        self._seq = int(raw) if raw else 0
        self._depths: dict[str, int] | None = None  # None: not counted yet, or unknown
        self._writes_ok = True  # False after a failed write, until one succeeds

    def _write(self, batch: Batch, moved: dict[str, int] | None) -> None:
        """Commit `batch` (holding `_lock`) and apply `moved` (outbox records added or, when
        negative, removed per sink) to the counters. On StoreError the counters become unknown:
        the write may apply later (WAL replay on reopen), so they are recounted after the next
        successful write."""
        try:
            self._db.commit(batch)
        except StoreError:
            self._depths, self._writes_ok = None, False
            raise
        self._writes_ok = True
        if self._depths is not None:
            if moved is None:
                self._depths = None
                return
            for sink, n in moved.items():
                self._depths[sink] = self._depths.get(sink, 0) + n

    def _counted(self) -> dict[str, int]:
        """The depth of every sink's outbox (holding `_lock`): one scan when not known."""
        if self._depths is not None:
            return self._depths
        counts: dict[str, int] = {}
        for key, _ in self._db.scan(_OUTBOX_TAG, ks.prefix_end(_OUTBOX_TAG), values=False):
            sink = key[1:-9].decode()  # tag, sink name, NUL, u64 sequence number
            counts[sink] = counts.get(sink, 0) + 1
        if self._writes_ok:
            self._depths = counts
        return counts

    # -- meta ------------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        raw = self._db.get(ks.meta_key(name))
        return None if raw is None else raw.decode()

    def set_meta(self, name: str, value: str) -> None:
        b = Batch()
        b.put(ks.meta_key(name), value.encode())
        self._db.commit(b)

    # -- ticks and alerts ------------------------------------------------------------------

    def get_tick(self, rule_id: str, tick_ms: int) -> TickRecord | None:
        raw = self._db.get(ks.tick_key(rule_id, tick_ms // 60_000))
        return None if raw is None else _tick_from(rule_id, raw)

    def last_tick(self, rule_id: str) -> TickRecord | None:
        prefix = ks.tick_prefix(rule_id)
        for _, raw in self._db.scan(prefix, ks.prefix_end(prefix), reverse=True):
            return _tick_from(rule_id, raw)
        return None

    def commit_tick(
        self,
        tick: TickRecord | None,
        events: Sequence[tuple[str, int, dict[str, Any]]],
        deliveries: Sequence[tuple[str, str, dict[str, Any]]],
        overflow: Sequence[tuple[str, str, dict[str, Any]]] = (),
        now_ms: int = 0,
        extra: Sequence[tuple[bytes, bytes]] = (),
        deletes: Sequence[bytes] = (),
    ) -> bool:
        """Record `tick` (or, with tick None, alerts outside any tick) with its alerts and
        deliveries atomically. False, and nothing written, if the tick was recorded before.

        `events` are (alert id, time ms, event); `deliveries` are (sink, alert id, event) for
        the outbox and `overflow` the same for sinks whose outbox was full (dead-lettered at once).
        `extra` are further puts and `deletes` keys to remove in the same write (the late and
        refused-key entries a tick consumed).
        """
        with self._lock:
            b = Batch()
            if tick is not None:
                if self.get_tick(tick.rule_id, tick.tick_ms) is not None:
                    return False
                now_ms = tick.evaluated_ms
                b.put(
                    ks.tick_key(tick.rule_id, tick.tick_ms // 60_000),
                    json.dumps(
                        {
                            "tick_ms": tick.tick_ms,
                            "alert_ids": list(tick.alert_ids),
                            "evaluated_ms": tick.evaluated_ms,
                            "excluded": tick.excluded,
                        }
                    ).encode(),
                )
            for alert_id, time_ms, event in events:
                b.put(ks.alert_key(time_ms, alert_id), json.dumps(event).encode())
                b.put(ks.alert_id_key(alert_id), ks.u64(time_ms))
            for key, value in extra:
                b.put(key, value)
            for key in deletes:
                b.delete(key)
            added: dict[str, int] = {}
            for sink, _, _ in deliveries:
                added[sink] = added.get(sink, 0) + 1
            # An outbox key among `extra` or `deletes` is not a write this method can count.
            raw = any(k[:1] == _OUTBOX_TAG for k in [*(k for k, _ in extra), *deletes])
            seq = self._seq
            for kind, items in ((ks.outbox_key, deliveries), (ks.deadletter_key, overflow)):
                for sink, alert_id, event in items:
                    seq += 1
                    record = {"alert_id": alert_id, "enqueued_ms": now_ms, "event": event}
                    if kind is ks.deadletter_key:
                        record["reason"] = "outbox full"
                    b.put(kind(sink, seq), json.dumps(record).encode())
            b.put(_SEQ_KEY, str(seq).encode())
            # Taken before the commit: a commit that fails in its WAL sync may still have
            # applied, and its numbers must never be reused (gaps are harmless).
            self._seq = seq
            self._write(b, None if raw else added)
            return True

    def alerts_of(self, tick: TickRecord) -> list[dict[str, Any]]:
        wanted = set(tick.alert_ids)
        found: dict[str, dict[str, Any]] = {}
        lower = ks.alert_bound(tick.tick_ms)
        for key, raw in self._db.scan(lower, ks.alert_bound(tick.tick_ms + 1)):
            alert_id = key[len(lower) :].decode()
            if alert_id in wanted:
                found[alert_id] = json.loads(raw)
        return [found[a] for a in tick.alert_ids if a in found]

    def alerts_since(self, since_ms: int, limit: int = 1000) -> list[dict[str, Any]]:
        out = []
        for _, raw in self._db.scan(ks.alert_bound(since_ms), b"M"):
            out.append(json.loads(raw))
            if len(out) >= limit:
                break
        return out

    def existing(self, alert_ids: Sequence[str]) -> set[str]:
        """The ids among `alert_ids` already recorded (by a tick or by stream mode)."""
        found = self._db.get_many([ks.alert_id_key(a) for a in alert_ids])
        return {a for a, raw in zip(alert_ids, found, strict=True) if raw is not None}

    def last_suppressed(self, rule_id: str, key: bytes) -> int | None:
        raw = self._db.get(ks.suppression_key(rule_id, key))
        return ks.from_u64(raw) if raw else None

    def expire(self, rule_ids: Sequence[str], before_ms: int) -> None:
        """Forget alerts and tick records older than `before_ms` (deliveries are kept)."""
        b = Batch()
        for key, _ in self._db.scan(ks.alert_bound(0), ks.alert_bound(before_ms), values=False):
            b.delete(ks.alert_id_key(key[9:].decode()))
        self._db.commit(b)
        self._db.delete_range(ks.alert_bound(0), ks.alert_bound(before_ms))
        for rule_id in rule_ids:
            self._db.delete_range(
                ks.tick_key(rule_id, 0), ks.tick_key(rule_id, max(0, -(-before_ms // 60_000)))
            )

    # -- outbox ----------------------------------------------------------------------------

    def pending(self, sink: str, after_seq: int = 0, limit: int = 100) -> list[Delivery]:
        prefix = ks.outbox_prefix(sink)
        out = []
        for key, raw in self._db.scan(ks.outbox_key(sink, after_seq + 1), ks.prefix_end(prefix)):
            out.append(Delivery(sink, ks.seq_of(key), json.loads(raw)))
            if len(out) >= limit:
                break
        return out

    def depth(self, sink: str) -> int:
        """Delivery records in `sink`'s outbox: a counter, not a scan (see the module doc)."""
        with self._lock:
            return self._counted().get(sink, 0)

    def ack(self, delivery: Delivery) -> None:
        """Remove an acknowledged delivery record (a no-op when it is gone already)."""
        key = ks.outbox_key(delivery.sink, delivery.seq)
        with self._lock:
            if self._db.get(key) is None:
                return
            b = Batch()
            b.delete(key)
            self._write(b, {delivery.sink: -1})

    def update(self, delivery: Delivery) -> None:
        """Persist a changed delivery record (attempt count, last error). A record no longer in
        the outbox (acknowledged or dead-lettered meanwhile) is not brought back."""
        key = ks.outbox_key(delivery.sink, delivery.seq)
        with self._lock:
            if self._db.get(key) is None:
                return
            b = Batch()
            b.put(key, json.dumps(delivery.record).encode())
            self._write(b, {})

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move `delivery` from the outbox to the dead letters with `reason`, atomically. A
        record no longer in the outbox (acknowledged meanwhile) is left alone: a redrive must
        not send a delivered alert again."""
        record = dict(delivery.record, reason=reason)
        key = ks.outbox_key(delivery.sink, delivery.seq)
        with self._lock:
            if self._db.get(key) is None:
                return
            b = Batch()
            b.delete(key)
            b.put(ks.deadletter_key(delivery.sink, delivery.seq), json.dumps(record).encode())
            self._write(b, {delivery.sink: -1})

    def deadletters(self, sink: str | None, sinks: Sequence[str]) -> Iterator[Delivery]:
        for name in [sink] if sink else sinks:
            for key, raw in self._db.scan_prefix(ks.deadletter_prefix(name)):
                yield Delivery(name, ks.seq_of(key), json.loads(raw))

    def deadletter_count(self, sink: str) -> int:
        return sum(1 for _ in self._db.scan_prefix(ks.deadletter_prefix(sink), values=False))

    def redrive(self, sink: str | None, sinks: Sequence[str]) -> int:
        """Move dead letters back into the outbox (same sequence numbers, attempts reset)."""
        moved: dict[str, int] = {}
        b = Batch()
        with self._lock:
            for d in list(self.deadletters(sink, sinks)):
                record = {
                    k: v
                    for k, v in d.record.items()
                    if k not in ("reason", "attempts", "last_error")
                }
                b.delete(ks.deadletter_key(d.sink, d.seq))
                b.put(ks.outbox_key(d.sink, d.seq), json.dumps(record).encode())
                moved[d.sink] = moved.get(d.sink, 0) + 1
            self._write(b, moved)
        return sum(moved.values())


def _tick_from(rule_id: str, raw: bytes) -> TickRecord:
    data = json.loads(raw)
    return TickRecord(
        rule_id=rule_id,
        tick_ms=int(data["tick_ms"]),
        alert_ids=tuple(data["alert_ids"]),
        evaluated_ms=int(data["evaluated_ms"]),
        excluded=int(data.get("excluded", 0)),
    )
