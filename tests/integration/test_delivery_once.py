"""Delivery within one process: each alert sent once, the outbox depth counted not scanned,
connections reused, and a worker that survives what one batch throws at it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pathwatch.config.model import Duration, RetryConfig, SinkConfig
from pathwatch.store import Database
from pathwatch.store import keyspace as ks
from pathwatch.store.alertlog import AlertStore

pytestmark = pytest.mark.integration

FAST_RETRY = RetryConfig(initial_backoff=Duration(0.05), max_backoff=Duration(0.2))


def event(i: int) -> dict[str, Any]:
    return {"id": f"alert-{i:05d}", "time": "2026-01-01T00:00:00Z", "risk_object": "node-1"}


def enqueue(alerts: AlertStore, sinks: Sequence[str], ids: range) -> list[str]:
    """Commit one alert per id with one delivery per sink, in one write (as a tick does)."""
    events = [(f"alert-{i:05d}", 1_700_000_000_000 + i, event(i)) for i in ids]
    deliveries = [(s, a, e) for a, _, e in events for s in sinks]
    assert alerts.commit_tick(None, events, deliveries, now_ms=time.time_ns() // 1_000_000)
    return [a for a, _, _ in events]


def outbox_count(db: Database, sink: str) -> int:
    """The brute-force depth: every outbox key of the sink, counted."""
    return sum(1 for _ in db.scan_prefix(ks.outbox_prefix(sink), values=False))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database(str(tmp_path / "data"))
    yield d
    d.close()


def webhook(url: str, name: str = "soc", **extra: Any) -> SinkConfig:
    return SinkConfig(name=name, type="webhook", url=url, retry=FAST_RETRY, **extra)


# -- the outbox depth: a counter ------------------------------------------------------------


class CountingDatabase(Database):
    """A real RocksDB that counts the scans reading the outbox keyspace."""

    outbox_scans = 0
    fail_next_commit = False

    def scan(self, lower: bytes, upper: bytes, **kwargs: Any) -> Iterator[tuple[bytes, bytes]]:
        if lower[:1] == b"O":
            self.outbox_scans += 1
        return super().scan(lower, upper, **kwargs)

    def commit(self, batch: Any) -> None:
        if self.fail_next_commit:
            self.fail_next_commit = False
            from pathwatch.store import StoreError

            raise StoreError("injected: WAL sync failed")
        super().commit(batch)


def depth_without_scanning(db: CountingDatabase, alerts: AlertStore, sink: str) -> int:
    """`alerts.depth(sink)`, asserting it read no outbox key to answer."""
    before = db.outbox_scans
    depth = alerts.depth(sink)
    assert db.outbox_scans == before, "depth() scanned the outbox"
    return depth


def test_outbox_depth_is_a_counter_kept_exact_by_every_outbox_write(tmp_path: Path) -> None:
    """After one count at first use, the depth of each sink's outbox is answered without
    reading the outbox, and equals the brute-force count after enqueue, overflow, retry
    updates, acks (twice for one record), dead letters, a redrive, a tick with other writes,
    and a write that failed."""
    db = CountingDatabase(str(tmp_path / "data"))
    try:
        alerts = AlertStore(db)
        assert alerts.depth("a") == 0  # the one count
        enqueue(alerts, ["a", "b"], range(100))
        overflow = [("a", "alert-x", event(0))]
        assert alerts.commit_tick(None, [], [], overflow, now_ms=1)

        def check() -> None:
            for s in ("a", "b"):
                assert depth_without_scanning(db, alerts, s) == outbox_count(db, s)

        check()
        assert depth_without_scanning(db, alerts, "a") == 100
        pending = alerts.pending("a", 0, limit=1000)
        for d in pending[:10]:
            alerts.ack(d)
        alerts.ack(pending[0])  # acknowledged twice: counted once
        for d in pending[10:15]:
            d.record["attempts"] = 1
            alerts.update(d)
        for d in pending[15:20]:
            alerts.dead_letter(d, "HTTP 400: no")
        alerts.dead_letter(pending[0], "acknowledged already")  # not in the outbox: left alone
        check()
        assert depth_without_scanning(db, alerts, "a") == 85
        assert alerts.redrive("a", ["a", "b"]) == 6  # 5 + the overflow
        check()
        assert depth_without_scanning(db, alerts, "a") == 91
        tick_extra = [(ks.meta_key("probe"), b"1")]
        assert alerts.commit_tick(None, [], [], now_ms=2, extra=tick_extra, deletes=[b"Zx"])
        check()
        db.fail_next_commit = True
        with pytest.raises(Exception, match="injected"):
            alerts.ack(pending[30])
        alerts.ack(pending[31])  # a write succeeds again: the counters are recounted once
        assert alerts.depth("a") == outbox_count(db, "a") == 90
        check()
    finally:
        db.close()


_KILLED_WRITER = """
import os, signal, sys
sys.path[:0] = {paths!r}
from pathwatch.store import Database
from pathwatch.store.alertlog import AlertStore
from tests.integration.test_delivery_once import enqueue

alerts = AlertStore(Database({path!r}))
enqueue(alerts, ["soc"], range(50))
pending = alerts.pending("soc", 0, limit=100)
for d in pending[:20]:
    alerts.ack(d)
for d in pending[20:25]:
    alerts.dead_letter(d, "HTTP 400")
print("written", alerts.depth("soc"), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_outbox_depth_is_exact_after_kill_9(tmp_path: Path) -> None:
    """A process that enqueued, acknowledged and dead-lettered is killed with SIGKILL; the
    reopened store counts the outbox once and then answers its exact depth from the counter."""
    path = str(tmp_path / "data")
    root = Path(__file__).resolve().parents[2]
    code = _KILLED_WRITER.format(paths=[str(root / "service"), str(root)], path=path)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["written", "25"]
    db = CountingDatabase(path)
    try:
        alerts = AlertStore(db)
        assert alerts.depth("soc") == 25 == outbox_count(db, "soc")
        for _ in range(100):
            assert depth_without_scanning(db, alerts, "soc") == 25
    finally:
        db.close()
