"""KeyspaceSweeper and the context counts over a real RocksDB in a temp dir."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pathwatch.app.service import retention_of
from pathwatch.clock import DAY_MS, HOUR_MS, MINUTE_MS
from pathwatch.observations import KeyTuple, ObservationBatch, Sighting
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.store import keyspace as ks
from pathwatch.store.alertlog import AlertStore
from pathwatch.store.codec import encode_key
from pathwatch.store.db import Batch, Database, DatabaseOptions
from pathwatch.store.firstseen import FirstSeenStore
from pathwatch.store.sweep import OWNERS, KeyspaceSweeper, SweepPolicy

RULE = dataclasses.replace(PARITY_RULE, baseline_minutes=24 * 60)
RETENTION = {RULE.id: retention_of(RULE, 256)}
HORIZON_MS = RETENTION[RULE.id].horizon_minutes * MINUTE_MS
T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY_MS


def key(host: str, path: str, pid: int = 1) -> KeyTuple:
    return (host, "prod", host, str(pid), path, path.rsplit("/", 1)[-1])


def store_in(db: Database) -> FirstSeenStore:
    store = FirstSeenStore(db, host_field={RULE.id: 0}, cluster_field={RULE.id: 1})
    store.set_context_fields(RULE.id, RULE.key_fields)
    return store


def observe(store: FirstSeenStore, keys: list[KeyTuple], now: int, rule: str = RULE.id) -> None:
    batch: ObservationBatch = {}
    for k in keys:
        sighting = Sighting()
        sighting.add(now - MINUTE_MS)
        batch[(rule, k)] = sighting
    retention = dict(RETENTION)
    retention.setdefault(rule, RETENTION[RULE.id])
    store.apply(batch, retention, now)


def count(db: Database, prefix: bytes) -> int:
    return sum(1 for _ in db.scan_prefix(prefix, values=False))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(str(tmp_path / "data"), DatabaseOptions(fsync=False))
    yield database
    database.close()


def test_every_keyspace_tag_has_an_owner_and_an_expiry() -> None:
    """The table in code names who writes each tag and when it goes, for every tag in use."""
    assert {o.tag for o in OWNERS} >= set("RAEGTLODHISPNZFMQCW")
    assert all(o.written_by and o.removed for o in OWNERS)


def test_seen_on_n_nodes_is_exact_beyond_5000_hosts_as_nodes_come_and_go(db: Database) -> None:
    """6,000 nodes ran python3 from /usr/bin: an alert on a new node counts all 6,000 (the
    old scan stopped at 5,000); after 2,500 of them are gone past the horizon and swept, it
    counts the 3,500 left."""
    store = store_in(db)
    hosts = [f"node-{i:05d}" for i in range(6_000)]
    observe(store, [key(h, "/usr/bin/python3") for h in hosts], T0)
    ctx = store.context.explain("prod", "new-node", "/tmp/python3", "python3", T0 + HOUR_MS)
    assert ctx["name_seen_on_other_nodes"] == 6_000
    assert ctx["name_usual_paths"] == [{"path": "/usr/bin/python3", "nodes": 6_000}]
    on_one = store.context.explain("prod", hosts[0], "/usr/bin/python3", None, T0 + HOUR_MS)
    assert on_one["path_seen_on_other_nodes"] == 5_999
    # Hosts first seen inside the window do not count as "before".
    assert store.context.explain("prod", "x", "/usr/bin/python3", None, T0 - HOUR_MS) == {
        "path_seen_on_other_nodes": 0
    }

    later = T0 + HORIZON_MS + 2 * DAY_MS
    observe(store, [key(h, "/usr/bin/python3") for h in hosts[2_500:]], later - DAY_MS)
    KeyspaceSweeper(store, db).sweep(RETENTION, later)
    ctx = store.context.explain("prod", "new-node", "/tmp/python3", "python3", later)
    assert ctx["name_seen_on_other_nodes"] == 3_500
    assert ctx["name_usual_paths"] == [{"path": "/usr/bin/python3", "nodes": 3_500}]
    assert count(db, b"P") == count(db, b"N") == 3_500


def test_a_process_running_for_months_keeps_its_context_and_host(db: Database) -> None:
    """A key observed every day for five horizons is never re-created, yet its context entry
    and its host's first-seen entry stay, while those of a host gone are removed."""
    store = store_in(db)
    sweeper = KeyspaceSweeper(store, db)
    days = 5 * HORIZON_MS // DAY_MS
    observe(store, [key("gone", "/bin/x")], T0)
    for day in range(days):
        now = T0 + day * DAY_MS
        observe(store, [key("stays", "/bin/x")], now)
        sweeper.sweep(RETENTION, now + HOUR_MS)
    now = T0 + days * DAY_MS
    ctx = store.context.explain("prod", "new", "/bin/x", "x", now)
    assert ctx["path_seen_on_other_nodes"] == 1
    assert store.entity_first_seen("h", "stays") == T0 - MINUTE_MS
    assert store.entity_first_seen("h", "gone") is None
    assert db.get(b"P" + b"prod\x00/bin/x\x00gone") is None


def test_suppressions_dead_letters_and_alert_ids_expire(db: Database) -> None:
    """Suppressions older than suppress_for + 1 day, dead letters enqueued before the dead-letter
    retention and alert ids past the alert retention are removed; newer ones stay."""
    store = store_in(db)
    alerts = AlertStore(db)
    now = T0 + 40 * DAY_MS
    skey = ks.suppression_key(RULE.id, encode_key(("h", "/p")))
    fresh = ks.suppression_key(RULE.id, encode_key(("h", "/q")))
    alerts.commit_tick(
        None,
        [("old-alert", now - 32 * DAY_MS, {}), ("new-alert", now - DAY_MS, {})],
        [],
        [("hook", "old-alert", {})],
        now_ms=now - 31 * DAY_MS,
        extra=[(skey, ks.u64(now - 3 * DAY_MS)), (fresh, ks.u64(now - 6 * HOUR_MS))],
    )
    alerts.commit_tick(None, [], [], [("hook", "new-alert", {})], now_ms=now - DAY_MS)
    policy = SweepPolicy(suppress_for_ms={RULE.id: DAY_MS})
    out = KeyspaceSweeper(store, db, policy).sweep(RETENTION, now)
    assert db.get(skey) is None and db.get(fresh) is not None
    assert [d.alert_id for d in alerts.deadletters("hook", ["hook"])] == ["new-alert"]
    assert alerts.existing(["old-alert", "new-alert"]) == {"new-alert"}
    assert (out["S"], out["D"], out["I"]) == (1, 1, 1)


def test_keyspaces_of_a_removed_rule_go_after_the_grace_period(db: Database) -> None:
    """A rule no longer enabled keeps its keys for the grace period (re-enabling it within it
    keeps its history) and loses every keyspace after it."""
    store = store_in(db)
    observe(store, [key("h", "/bin/a")], T0, rule="old_rule")
    observe(store, [key("h", "/bin/a")], T0)
    wb = Batch()
    wb.put(ks.suppression_key("old_rule", b"k"), ks.u64(T0))
    wb.put(ks.tick_key("old_rule", 1), json.dumps({}).encode())
    db.commit(wb)
    sweeper = KeyspaceSweeper(store, db, SweepPolicy(rule_grace_ms=10 * DAY_MS))
    sweeper.sweep(RETENTION, T0 + HOUR_MS)  # the grace starts when the sweep first sees it
    sweeper.sweep(RETENTION, T0 + 9 * DAY_MS)
    assert count(db, ks.record_prefix("old_rule")) == 1
    out = sweeper.sweep(RETENTION, T0 + 11 * DAY_MS)
    assert out["rule"] == 1
    for tag in (b"R", b"A", b"E", b"G", b"S", b"T"):
        assert count(db, tag + b"old_rule\x00") == 0, tag
    assert db.get(ks.meta_key("keys:old_rule")) is None
    assert count(db, ks.record_prefix(RULE.id)) == 0  # expired: unseen past its horizon


def test_a_data_dir_without_counts_is_counted_by_the_first_sweep(db: Database) -> None:
    """P/N entries written by a release without counts are counted once by the sweep; from
    then on the answer is exact (before it, the old bounded scan answers)."""
    wb = Batch()
    for i in range(3):
        wb.put(b"P" + f"prod\x00/bin/a\x00h{i}".encode(), ks.u64(T0))
        wb.put(b"N" + f"prod\x00a\x00/bin/a\x00h{i}".encode(), ks.u64(T0))
    db.commit(wb)
    store = store_in(db)
    assert not store.context.counted
    legacy = store.context.explain("prod", "x", "/bin/a", "a", T0 + 1)
    assert legacy["name_seen_on_other_nodes"] == 3
    observe(store, [key("h9", "/bin/a")], T0 + HOUR_MS)
    KeyspaceSweeper(store, db).sweep(RETENTION, T0 + 2 * HOUR_MS)
    assert store.context.counted
    ctx = store.context.explain("prod", "x", "/bin/a", "a", T0 + 2 * HOUR_MS)
    assert ctx["name_seen_on_other_nodes"] == 4
    assert ctx["path_seen_on_other_nodes"] == 4


def test_a_sweep_out_of_time_resumes_where_it_stopped(db: Database) -> None:
    """With no time budget left, walks stop after one batch and the next sweep goes on from
    there: every expired suppression goes in the end, never in one giant write."""
    store = store_in(db)
    wb = Batch()
    for i in range(25_000):
        wb.put(ks.suppression_key(RULE.id, encode_key((f"h{i:05d}", "/p"))), ks.u64(T0))
    db.commit(wb)
    ticks = iter(range(1_000_000))
    sweeper = KeyspaceSweeper(
        store, db, SweepPolicy(budget_s=0.5), monotonic=lambda: float(next(ticks))
    )
    removed = [sweeper.sweep(RETENTION, T0 + 10 * DAY_MS)["S"] for _ in range(4)]
    assert removed[0] < 25_000
    assert sum(removed) == 25_000
    assert count(db, b"S") == 0
