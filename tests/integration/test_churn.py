"""120 simulated days of churn through the real store: every keyspace stays flat."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from pathwatch.app.service import retention_of
from pathwatch.clock import DAY_MS, HOUR_MS, MINUTE_MS
from pathwatch.observations import ObservationBatch, Sighting
from pathwatch.rules.builtin import NEW_PATH_PER_NODE, PARITY_RULE
from pathwatch.store import keyspace as ks
from pathwatch.store.alertlog import AlertStore, TickRecord
from pathwatch.store.codec import encode_key
from pathwatch.store.db import Database, DatabaseOptions
from pathwatch.store.firstseen import FirstSeenStore
from pathwatch.store.sweep import KeyspaceSweeper, SweepPolicy

DAY0 = 1_700_006_400_000 - 1_700_006_400_000 % DAY_MS
HOSTS_PER_DAY = 20
HOST_LIFE_DAYS = 5
RULE = dataclasses.replace(PARITY_RULE, baseline_minutes=7 * 24 * 60, suppress_for_minutes=24 * 60)
# Enabled for the first 10 days only, then removed from the configuration.
GONE = dataclasses.replace(NEW_PATH_PER_NODE, enabled=True, baseline_minutes=7 * 24 * 60)
ALERT_RETENTION_MS = 14 * DAY_MS


def _keys(host: str, day: int, born: int) -> list[tuple[str, ...]]:
    """The processes of `host` on `day`: common paths, one path per day, a pid per day."""
    procs = [
        (1, "/usr/bin/containerd"),
        (2, "/usr/bin/kubelet"),
        (3, f"/opt/app-{born}/bin/server"),
        (1000 + day, "/usr/bin/python3"),
        (2000 + day, f"/var/lib/job-{day}/run"),
    ]
    return [(host, "prod", host, str(pid), path, path.rsplit("/", 1)[-1]) for pid, path in procs]


def _census(db: Database) -> Counter[str]:
    """Entries per keyspace tag (the C counts per sub-kind), by scanning the database."""
    counts: Counter[str] = Counter()
    for key, _ in db.scan(b"\x00", b"\xff", values=False):
        tag = key[:2].decode() if key[:1] == b"C" else key[:1].decode()
        counts[tag] += 1
    return counts


def test_keyspaces_stay_flat_over_120_days_of_churn(tmp_path: Path) -> None:
    """Hosts that come and go, paths unique per day, alerts with suppressions and dead letters,
    a rule removed after 10 days, swept once a day: from the horizon on, the number of
    entries of every keyspace and the bytes on disk stop growing (day 60 = day 120)."""
    db = Database(str(tmp_path / "data"), DatabaseOptions(fsync=False))
    rules = [RULE, GONE]
    store = FirstSeenStore(
        db,
        host_field={r.id: 0 for r in rules},
        cluster_field={r.id: 1 for r in rules},
    )
    for rule in rules:
        store.set_context_fields(rule.id, rule.key_fields)
    alerts = AlertStore(db)
    sweeper = KeyspaceSweeper(
        store,
        db,
        SweepPolicy(
            suppress_for_ms={RULE.id: RULE.suppress_for_minutes * MINUTE_MS},
            alert_retention_ms=ALERT_RETENTION_MS,
            deadletter_retention_ms=ALERT_RETENTION_MS,
            sinks=["hook"],
        ),
    )
    seen: dict[int, Counter[str]] = {}
    size: dict[int, int] = {}
    for day in range(1, 121):
        rules_now = [RULE, GONE] if day <= 10 else [RULE]
        retention = {r.id: retention_of(r, 256) for r in rules_now}
        hosts = [
            (f"node-{born}-{i}", born)
            for born in range(max(1, day - HOST_LIFE_DAYS + 1), day + 1)
            for i in range(HOSTS_PER_DAY)
        ]
        for hour in (1, 13):
            now = DAY0 + day * DAY_MS + hour * HOUR_MS
            batch: ObservationBatch = {}
            for host, born in hosts:
                for key in _keys(host, day, born):
                    for rule in rules_now:
                        fields = key if rule is RULE else (key[0], key[1], key[2], key[4])
                        sighting = Sighting()
                        sighting.add(now - MINUTE_MS)
                        batch[(rule.id, fields)] = sighting
            store.apply(batch, retention, now)
        tick = DAY0 + day * DAY_MS + 14 * HOUR_MS
        new_hosts = [h for h, born in hosts if born == day]
        events = [(f"{day}-{h}", tick, {"host": h}) for h in new_hosts]
        suppressions = [
            (ks.suppression_key(RULE.id, encode_key((h, f"/var/lib/job-{day}/run"))), ks.u64(tick))
            for h in new_hosts
        ]
        overflow = [("hook", f"{day}-{h}", {"host": h}) for h in new_hosts[:5]]
        alerts.commit_tick(
            TickRecord(RULE.id, tick, tuple(a for a, _, _ in events), tick),
            events,
            [],
            overflow,
            extra=suppressions,
        )
        alerts.expire([RULE.id], tick - ALERT_RETENTION_MS)  # the scheduler's housekeeping
        sweeper.sweep(retention, tick)
        if day % 30 == 0:
            db.compact()
            seen[day] = _census(db)
            size[day] = db.property_int("rocksdb.live-sst-files-size")
    db.close()
    print({d: dict(sorted(c.items())) for d, c in seen.items()}, size)
    for tag in set(seen[60]) | set(seen[120]):
        assert seen[120][tag] == seen[60][tag], (tag, seen[60][tag], seen[120][tag])
    for tag in ("P", "N", "H", "S", "D", "L", "I", "T", "R"):
        assert seen[120][tag] > 0, tag
    assert abs(size[120] - size[60]) <= 0.1 * size[60], size
