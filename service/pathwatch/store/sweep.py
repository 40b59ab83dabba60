"""KeyspaceSweeper: every keyspace tag has an owner and an expiry; this removes what expired."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import structlog

from pathwatch.clock import MINUTE_MS
from pathwatch.store import keyspace as ks
from pathwatch.store.db import Batch, Database
from pathwatch.store.firstseen import FirstSeenStore, Retention

log = structlog.get_logger(component="store")

DAY_MS = 86_400_000
_BATCH = 10_000
# Alerts of catch-up ticks are judged at their tick's time, up to a day behind the clock:
# suppressions and alert ids are kept this much longer than their own bound.
_SLACK_MS = DAY_MS


@dataclass(frozen=True, slots=True)
class Owner:
    """Who writes a keyspace and when its entries are removed (docs/storage.md, Expiry)."""

    tag: str
    written_by: str
    removed: str


OWNERS: tuple[Owner, ...] = (
    Owner("R", "writer (FirstSeenStore.apply)", "last observation older than the horizon"),
    Owner("A", "writer", "hours older than window + 3 days (range delete)"),
    Owner("E", "writer", "with the records it lists, past the horizon"),
    Owner("G", "writer", "minutes older than window + 3 days (range delete)"),
    Owner("T", "tick runner (AlertStore.commit_tick)", "scheduler: older than alert_retention"),
    Owner("L", "tick runner, stream publisher", "scheduler: older than alert_retention"),
    Owner("I", "with L", "with L; this sweep: older than alert_retention + 1 day"),
    Owner("O", "tick runner; dispatcher deletes on delivery", "delivered or dead-lettered"),
    Owner("D", "dispatcher", "enqueued longer than the dead-letter retention ago"),
    Owner("H", "writer (new keys)", "no stored key of the host / cluster left"),
    Owner("S", "tick runner (suppress_for)", "older than the rule's suppress_for + 1 day"),
    Owner("P", "writer (new keys)", "no stored key of a context rule holds it"),
    Owner("N", "writer (new keys)", "no stored key of a context rule holds it"),
    Owner("C", "writer, with P and N", "with the P / N entries it counts"),
    Owner("Z", "writer (late minutes)", "consumed by the rule's next tick"),
    Owner("F", "writer (refused keys)", "consumed by the next tick; hours past the horizon"),
    Owner("Q", "writer (unreadable records)", "quarantined longer than the horizon ago"),
    Owner("W", "writer (logged minutes)", "folded into R records: store.fold_interval"),
    Owner("M", "store, alert log", "per-rule entries with the rule; the rest are a few bytes"),
)
# Keyspaces scoped by rule: all removed together once a rule is neither configured nor
# enabled for longer than the grace period.
RULE_TAGS = (b"R", b"A", b"E", b"G", b"T", b"S", b"Z", b"F", b"Q")
_RULE_META = ("keys:", "onsets:", "rule-seen:")


@dataclass(frozen=True, slots=True)
class SweepPolicy:
    """What the sweep keeps. Defaults follow the configuration's defaults.

    `suppress_for_ms`: per rule, its suppress_for. `deadletter_retention_ms`: dead letters
    (and outbox records of sinks no longer configured, `sinks`) enqueued longer ago are
    removed; None keeps them all. `rule_grace_ms`: how long a rule's keyspaces outlive its
    removal or disabling (None: the longest retention horizon, at least 31 days), so a rule
    re-enabled within it keeps its history. `budget_s` bounds the walks of one sweep.
    """

    suppress_for_ms: Mapping[str, int] = field(default_factory=dict)
    alert_retention_ms: int = 30 * DAY_MS
    deadletter_retention_ms: int | None = 30 * DAY_MS
    sinks: Collection[str] | None = None
    rule_grace_ms: int | None = None
    budget_s: float = 10.0


class KeyspaceSweeper:
    """Removes expired entries of every keyspace. Writer thread only: it rewrites context
    counts and records that the writer also writes (see FirstSeenStore)."""

    def __init__(
        self,
        store: FirstSeenStore,
        db: Database,
        policy: SweepPolicy | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._db = db
        self._policy = policy or SweepPolicy()
        self._monotonic = monotonic
        self._cursor: dict[str, bytes] = {}

    def sweep(self, retention: Mapping[str, Retention], now_ms: int) -> dict[str, int]:
        """One sweep at `now_ms` for the enabled rules' `retention`: entries removed per tag
        ("rule": records of rules removed after their grace). Deletes go in batches of 10,000;
        walks stop after `budget_s` and resume there next time. Raises StoreError."""
        deadline = self._monotonic() + self._policy.budget_s

        def in_time() -> bool:
            return self._monotonic() < deadline

        out = dict.fromkeys(("R", "E", "P", "N", "H", "S", "I", "D", "O", "Q", "rule"), 0)
        horizon_ms = max(
            (r.horizon_minutes * MINUTE_MS for r in retention.values()), default=31 * DAY_MS
        )
        for rule, ret in retention.items():
            keys, index = self._store.expire_rule(rule, ret, now_ms)
            out["R"] += keys
            out["E"] += index
            floor_hour = (now_ms // MINUTE_MS - ret.horizon_minutes) // 60
            if floor_hour > 0:
                prefix = ks.refused_prefix(rule)
                self._db.delete_range(prefix, prefix + _u32(floor_hour))
        out["rule"] = self._purge_rules(retention, now_ms, max(horizon_ms, 31 * DAY_MS))
        stale = now_ms - horizon_ms
        # Every walk does at least one batch, so each keyspace makes progress every sweep.
        out.update(self._store.context.sweep(now_ms, stale, self._store.context_liveness, in_time))
        out["H"], resume = self._store.sweep_entities(
            now_ms, stale, self._cursor.get("H", b"H"), in_time
        )
        self._set_cursor("H", resume)
        out["S"] = self._walk("S", b"S", self._suppression_expired(retention, now_ms), in_time)
        alerts_before = now_ms - self._policy.alert_retention_ms - _SLACK_MS
        out["I"] = self._walk("I", b"I", lambda k, v: ks.from_u64(v) < alerts_before, in_time)
        out["Q"] = self._walk("Q", b"Q", _json_older("at_ms", now_ms - horizon_ms), in_time)
        if self._policy.deadletter_retention_ms is not None:
            dead = _json_older("enqueued_ms", now_ms - self._policy.deadletter_retention_ms)
            out["D"] = self._walk("D", b"D", dead, in_time)
            if self._policy.sinks is not None:
                for sink in _names(self._db, b"O"):
                    if sink not in self._policy.sinks:
                        prefix = ks.outbox_prefix(sink)
                        out["O"] += self._walk("O:" + sink, prefix, dead, in_time)
        return out

    def _set_cursor(self, name: str, resume: bytes | None) -> None:
        if resume is None:
            self._cursor.pop(name, None)
        else:
            self._cursor[name] = resume

    def _walk(
        self,
        name: str,
        prefix: bytes,
        expired: Callable[[bytes, bytes], bool],
        in_time: Callable[[], bool],
    ) -> int:
        """Delete the entries under `prefix` that `expired(key, value)` says, from where the
        last walk stopped; stops when out of time after a batch. Returns the number deleted."""
        wb = Batch()
        deleted = 0
        resume: bytes | None = None
        lower = max(prefix, self._cursor.get(name, prefix))
        for read, (key, value) in enumerate(self._db.scan(lower, ks.prefix_end(prefix)), 1):
            if expired(key, value):
                wb.delete(key)
                deleted += 1
            if wb.count >= _BATCH:
                self._db.commit(wb)
                wb = Batch()
            if read % _BATCH == 0 and not in_time():
                resume = key + b"\x00"
                break
        self._db.commit(wb)
        self._set_cursor(name, resume)
        return deleted

    def _suppression_expired(
        self, retention: Mapping[str, Retention], now_ms: int
    ) -> Callable[[bytes, bytes], bool]:
        """A suppression expires once it can no longer suppress (suppress_for + 1 day). Those
        of rules not enabled go with the rule."""
        cutoffs = {
            rule.encode(): now_ms - self._policy.suppress_for_ms.get(rule, 0) - _SLACK_MS
            for rule in retention
        }

        def expired(key: bytes, value: bytes) -> bool:
            cutoff = cutoffs.get(key[1:].partition(b"\x00")[0])
            return cutoff is not None and ks.from_u64(value) < cutoff

        return expired

    def _purge_rules(self, retention: Mapping[str, Retention], now_ms: int, grace: int) -> int:
        """Remove every keyspace of rules not enabled for longer than the grace period (one
        range delete per tag); returns their key records. Enabled rules are marked seen."""
        wb = Batch()
        for rule in retention:
            wb.put(ks.meta_key(f"rule-seen:{rule}"), str(now_ms).encode())
        self._db.commit(wb)
        grace = self._policy.rule_grace_ms if self._policy.rule_grace_ms is not None else grace
        stored: set[str] = set()
        for tag in RULE_TAGS:
            stored.update(_names(self._db, tag))
        for meta in _RULE_META:
            prefix = ks.meta_key(meta)
            stored.update(k[len(prefix) :].decode() for k, _ in self._db.scan_prefix(prefix))
        purged = 0
        for rule in sorted(stored - set(retention)):
            seen_key = ks.meta_key(f"rule-seen:{rule}")
            raw = self._db.get(seen_key)
            if raw is None:
                wb = Batch()
                wb.put(seen_key, str(now_ms).encode())  # its grace starts now
                self._db.commit(wb)
                continue
            if now_ms - int(raw) <= grace:
                continue
            records = self._store.key_count(rule)
            for tag in RULE_TAGS:
                prefix = tag + rule.encode() + b"\x00"
                self._db.delete_range(prefix, ks.prefix_end(prefix))
            wb = Batch()
            for meta in _RULE_META:
                wb.delete(ks.meta_key(meta + rule))
            self._db.commit(wb)
            self._store.forget_rule(rule)
            purged += records
            log.info("keyspaces of a rule no longer enabled removed", rule=rule, keys=records)
        return purged


def _u32(value: int) -> bytes:
    return max(0, value).to_bytes(4, "big")


def _names(db: Database, tag: bytes) -> list[str]:
    """The rule or sink names under a name-scoped `tag` (one seek per name)."""
    out: list[str] = []
    lower, upper = tag, ks.prefix_end(tag)
    while True:
        found = None
        for key, _ in db.scan(lower, upper, values=False):
            found = key
            break
        if found is None:
            return out
        name, sep, _ = found[1:].partition(b"\x00")
        if sep:
            out.append(name.decode("utf-8", "surrogatepass"))
            lower = ks.prefix_end(tag + name + b"\x00")
        else:
            lower = found + b"\x00"


def _json_older(field_name: str, before_ms: int) -> Callable[[bytes, bytes], bool]:
    """For JSON values: the time in `field_name` lies before `before_ms` (unreadable: no)."""

    def expired(key: bytes, value: bytes) -> bool:
        try:
            at = json.loads(value).get(field_name)
        except (ValueError, AttributeError):
            return False
        return isinstance(at, int) and at < before_ms

    return expired
