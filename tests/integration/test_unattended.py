"""Issue 12, findings 1-3: a dead loop is never invisible, a bad record never stops ingest, a
failing rule never starves the others, no catch-up before the first start, and stream alerts
never hold up an acknowledgement. Real RocksDB, real threads, time injected where it matters.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pathwatch.app.service import retention_of
from pathwatch.clock import HOUR_MS, MINUTE_MS, FakeClock
from pathwatch.observations import ObservationBatch, Sighting
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.scheduler import Scheduler, TickRunner
from pathwatch.scheduler.stream import StreamPublisher
from pathwatch.store import AlertStore, Database, FirstSeenStore, Retention, TickRecord
from pathwatch.store import keyspace as ks
from pathwatch.store.codec import encode_key
from pathwatch.store.writer import Backpressure, IngestWriter
from pathwatch.supervision import Supervisor
from pathwatch.telemetry.metrics import Metrics
from tests.support import RULE, Proc, ServiceProcess, export, minute_floor, now_ms, process_request

START = 1_800_000_000_000 - 1_800_000_000_000 % HOUR_MS
KEY = ("node-1", "prod", "node-1", "42", "/tmp/x", "x")


def _batch(key: tuple[str, ...], at_ms: int, rule: str = PARITY_RULE.id) -> ObservationBatch:
    s = Sighting()
    s.add(at_ms)
    return {(rule, key): s}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database(str(tmp_path / "db"))
    yield d
    d.close()


# -- finding 1: a dead loop is visible, and pending work is answered --------------------------


class ExplodingStore(FirstSeenStore):
    """A store with a bug: `apply` raises an unexpected error while `explode` is set."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.explode = threading.Event()

    def apply(self, batch: ObservationBatch, *args: Any, **kwargs: Any) -> Any:
        if self.explode.is_set():
            raise RuntimeError("a bug in the store")
        return super().apply(batch, *args, **kwargs)


def test_writer_bug_fails_pending_exports_at_once_and_the_writer_comes_back(
    db: Database,
) -> None:
    """An unexpected exception in the writer answers its batch with an error at once (not a
    timeout), is counted, and the supervised writer restarts and writes again."""
    metrics = Metrics()
    store = ExplodingStore(db)
    clock = FakeClock(START)
    retention = {PARITY_RULE.id: retention_of(PARITY_RULE, 256)}
    writer = IngestWriter(store, lambda: retention, clock, metrics)
    supervisor = Supervisor(metrics, initial_backoff_s=0.05)
    supervisor.spawn("writer", writer.run)
    try:
        store.explode.set()
        ticket = writer.submit(_batch(KEY, START - MINUTE_MS))
        assert ticket.wait(10) and ticket.error is not None
        assert "a bug in the store" in str(ticket.error)
        assert metrics.registry.get_sample_value(
            "pathwatch_component_failures_total", {"component": "writer"}
        )
        store.explode.clear()
        for _ in range(200):  # the restart is a positive barrier: a write succeeds again
            try:
                ok = writer.submit(_batch(KEY, START - MINUTE_MS))
            except Backpressure:
                threading.Event().wait(0.05)
                continue
            assert ok.wait(10) and ok.error is None
            break
        else:
            pytest.fail("the writer did not come back")
        assert store.get(PARITY_RULE.id, KEY) is not None
    finally:
        writer.shutdown(5)
        supervisor.stop(5)


def test_component_that_keeps_failing_is_given_up_and_reported() -> None:
    """After repeated failures a component is given up: `failed` and `needs_restart` name it
    (/readyz and /healthz turn 503 on them), and cleanup ran after each failure."""
    metrics = Metrics()
    supervisor = Supervisor(metrics, initial_backoff_s=0.01, max_failures=3)
    cleanups: list[BaseException] = []
    done = threading.Event()

    def broken(stop: threading.Event) -> None:
        raise ValueError("never works")

    def cleanup(exc: BaseException) -> None:
        cleanups.append(exc)
        if len(cleanups) == 3:
            done.set()

    supervisor.spawn("writer", broken, on_failure=cleanup, restart_cures=False)
    assert done.wait(10)
    supervisor.stop(5)
    assert supervisor.failed() == ["writer"]
    assert supervisor.needs_restart() == ["writer"]
    assert len(cleanups) == 3


def test_unreadable_record_is_quarantined_and_ingest_goes_on(tmp_path: Path) -> None:
    """A key record in an unknown format version no longer kills the writer: the running
    service sets it aside (listed by /api/v1/quarantine), the key starts anew and alerts,
    and every other key is ingested."""
    data = tmp_path / "data"
    svc = ServiceProcess(data).start()
    t = minute_floor(now_ms())
    bad = Proc(7, "/usr/bin/corrupted")
    try:
        export(svc.grpc_port, process_request([bad], t - 3 * HOUR_MS))
    finally:
        assert svc.stop() == 0
    key = (bad.host, bad.cluster, bad.host, str(bad.pid), bad.path, bad.exe_name)
    db = Database(str(data))
    record = ks.record_key(RULE, encode_key(key))
    raw = db.get(record)
    assert raw is not None
    from pathwatch.store.db import Batch

    b = Batch()
    b.put(record, bytes([9]) + raw[1:])  # written by "a newer release"
    db.commit(b)
    db.close()
    svc = ServiceProcess(data).start()
    try:
        response = export(svc.grpc_port, process_request([bad, Proc(8, "/tmp/other")], t - 60_000))
        assert response.partial_success.rejected_data_points == 0
        status, body = svc.api("GET", "/api/v1/quarantine")
        assert status == 200
        assert [q["key"] for q in body["quarantined"]] == [list(key)]
        assert "version 9" in body["quarantined"][0]["reason"]
        paths = {a["fields"]["process.executable.path"] for a in svc.evaluate(t)["alerts"]}
        assert paths == {"/usr/bin/corrupted", "/tmp/other"}
        status, ready = svc.api("GET", "/readyz")
        assert status == 200, ready
    finally:
        svc.stop()


# -- findings 1 and 2: the scheduler -----------------------------------------------------------


class FailingRunner(TickRunner):
    """A runner whose evaluation of one rule raises an unexpected error."""

    broken: str = ""

    def run(self, rule: Any, tick_ms: int) -> Any:
        if rule.id == self.broken:
            raise KeyError("a bug in this rule's evaluation")
        return super().run(rule, tick_ms)


def _scheduler(
    db: Database, clock: FakeClock, rules: list[Any], first_start_ms: int
) -> tuple[Scheduler, FailingRunner, AlertStore]:
    alerts = AlertStore(db)
    metrics = Metrics()
    runner = FailingRunner(FirstSeenStore(db), alerts, [], clock, metrics, outbox_depth=lambda _: 0)
    return Scheduler(rules, runner, alerts, clock, metrics, first_start_ms), runner, alerts


def test_a_failing_rule_never_stops_the_others_and_keeps_its_error(db: Database) -> None:
    """A rule whose tick raises is retried and its error stays visible while the rules after
    it run their ticks; the error clears only when that rule succeeds."""
    clock = FakeClock(START + 2 * HOUR_MS + 5 * MINUTE_MS)
    first, second = replace(PARITY_RULE, id="first"), replace(PARITY_RULE, id="second")
    scheduler, runner, alerts = _scheduler(db, clock, [first, second], START)
    runner.broken = "first"
    scheduler.run_due(clock.now_ms())
    assert alerts.last_tick("second") is not None
    assert alerts.last_tick("first") is None
    assert "a bug in this rule" in scheduler.rule_errors["first"]
    clock.advance(3600)
    scheduler.run_due(clock.now_ms())  # "second" succeeds again: "first"'s error stays
    assert "first" in scheduler.rule_errors
    runner.broken = ""
    scheduler.run_due(clock.now_ms())
    assert scheduler.rule_errors == {}
    assert alerts.last_tick("first") is not None


def test_no_tick_before_the_first_start_whatever_the_api_recorded(db: Database) -> None:
    """A tick recorded through the API for a minute before the data dir existed (07:39) does
    not make the scheduler catch up ticks from before the first start (08:00 when the data
    dir was created at 08:35)."""
    first_start = START + 8 * HOUR_MS + 35 * MINUTE_MS
    clock = FakeClock(first_start + 2 * MINUTE_MS)
    scheduler, _, alerts = _scheduler(db, clock, [PARITY_RULE], first_start)
    api_tick = START + 7 * HOUR_MS + 39 * MINUTE_MS
    alerts.commit_tick(TickRecord(PARITY_RULE.id, api_tick, (), clock.now_ms()), [], [])
    assert scheduler.run_due(clock.now_ms()) == 0
    assert alerts.get_tick(PARITY_RULE.id, START + 8 * HOUR_MS) is None
    clock.set_ms(START + 9 * HOUR_MS + 2 * MINUTE_MS)
    assert scheduler.run_due(clock.now_ms()) == 1
    assert alerts.get_tick(PARITY_RULE.id, START + 9 * HOUR_MS) is not None


# -- finding 3: stream alerts off the acknowledgement path ------------------------------------


def test_stream_alerts_never_hold_up_an_acknowledgement(db: Database) -> None:
    """While an evaluation holds the tick runner (here: its lock), a write that raises stream
    alerts is acknowledged; the stream alert is published once the evaluation is done."""
    metrics = Metrics()
    clock = FakeClock(START)
    store = FirstSeenStore(db)
    alerts = AlertStore(db)
    runner = TickRunner(store, alerts, [], clock, metrics, outbox_depth=lambda _: 0)
    stream_rule = replace(PARITY_RULE, mode="stream")
    retention: dict[str, Retention] = {
        stream_rule.id: replace(retention_of(stream_rule, 256), stream=True)
    }
    publisher = StreamPublisher(metrics)
    writer = IngestWriter(
        store,
        lambda: retention,
        clock,
        metrics,
        on_stream=lambda hits: publisher.offer(
            lambda: runner.stream({stream_rule.id: stream_rule}, hits), len(hits)
        ),
    )
    supervisor = Supervisor(metrics)
    supervisor.spawn("writer", writer.run)
    supervisor.spawn("stream", publisher.run)
    try:
        with runner._lock:  # an evaluation in progress
            ticket = writer.submit(_batch(KEY, START - MINUTE_MS))
            assert ticket.wait(10) and ticket.error is None  # acknowledged meanwhile
        for _ in range(200):
            if alerts.alerts_since(0):
                break
            threading.Event().wait(0.05)
        assert [a["fields"]["process.executable.path"] for a in alerts.alerts_since(0)] == [
            "/tmp/x"
        ]
    finally:
        writer.shutdown(5)
        supervisor.stop(5)


def test_the_writer_runs_the_keyspace_sweep(db: Database) -> None:
    """The supervised writer runs the keyspace sweep on its own thread once the expiry
    interval has passed: an expired suppression record is removed and counted."""
    from pathwatch.store.db import Batch
    from pathwatch.store.sweep import KeyspaceSweeper, SweepPolicy

    metrics = Metrics()
    clock = FakeClock(START + 40 * 86_400_000)
    store = FirstSeenStore(db)
    retention = {PARITY_RULE.id: retention_of(PARITY_RULE, 256)}
    stale = ks.suppression_key(PARITY_RULE.id, encode_key(("node-1", "/tmp/x")))
    b = Batch()
    b.put(stale, ks.u64(START))  # 40 days old; suppress_for is 6 h
    db.commit(b)
    sweeper = KeyspaceSweeper(store, db, SweepPolicy(suppress_for_ms={PARITY_RULE.id: 6 * HOUR_MS}))
    writer = IngestWriter(store, lambda: retention, clock, metrics, sweeper=sweeper)
    supervisor = Supervisor(metrics)
    supervisor.spawn("writer", writer.run)
    try:
        for _ in range(100):
            clock.advance(120)  # past the first sweep's delay, seen within the loop's 1 s wait
            if db.get(stale) is None:
                break
            threading.Event().wait(0.1)
        assert db.get(stale) is None
        assert metrics.registry.get_sample_value(
            "pathwatch_keyspace_entries_swept_total", {"keyspace": "S"}
        )
    finally:
        writer.shutdown(5)
        supervisor.stop(5)
