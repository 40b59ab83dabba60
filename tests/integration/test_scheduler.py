"""Scheduler, tick runner and store together on a real RocksDB, with time injected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pathwatch.app.service import retention_of
from pathwatch.clock import DAY_MS, HOUR_MS, MINUTE_MS, FakeClock
from pathwatch.observations import Sighting
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.scheduler import Scheduler, TickRunner
from pathwatch.store import AlertStore, Database, FirstSeenStore
from pathwatch.telemetry.metrics import Metrics

START = 1_800_000_000_000 - 1_800_000_000_000 % HOUR_MS + 10 * MINUTE_MS  # 10 past an hour
KEY = ("node-1", "prod", "node-1", "42", "/tmp/x", "x")


class Rig:
    def __init__(self, path: Path, clock: FakeClock, max_ticks: int = 24) -> None:
        self.db = Database(str(path))
        self.clock = clock
        self.firstseen = FirstSeenStore(self.db)
        self.alerts = AlertStore(self.db)
        self.metrics = Metrics()
        first = self.alerts.get_meta("first_start_ms")
        if first is None:
            first = str(clock.now_ms())
            self.alerts.set_meta("first_start_ms", first)
        self.runner = TickRunner(
            self.firstseen, self.alerts, [], clock, self.metrics, outbox_depth=lambda _: 0
        )
        self.scheduler = Scheduler(
            [PARITY_RULE], self.runner, self.alerts, clock, self.metrics, int(first), max_ticks
        )

    def observe(self, key: tuple[str, ...], at_ms: int) -> None:
        s = Sighting()
        s.add(at_ms)
        retention = {PARITY_RULE.id: retention_of(PARITY_RULE, 256)}
        self.firstseen.apply({(PARITY_RULE.id, key): s}, retention, self.clock.now_ms())

    def ticks(self) -> list[int]:
        out = []
        t = self.alerts.last_tick(PARITY_RULE.id)
        while t is not None:
            out.append(t.tick_ms)
            prev = [
                x
                for x in range(t.tick_ms - HOUR_MS, START - 2 * DAY_MS, -HOUR_MS)
                if self.alerts.get_tick(PARITY_RULE.id, x)
            ]
            t = self.alerts.get_tick(PARITY_RULE.id, prev[0]) if prev else None
        return sorted(out)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    def close(self) -> None:
        self.db.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def rig(tmp_path: Path, clock: FakeClock) -> Iterator[Rig]:
    r = Rig(tmp_path / "db", clock)
    yield r
    r.close()


def test_tick_runs_after_delay_and_only_once(rig: Rig, clock: FakeClock) -> None:
    """The hourly tick runs once the delay (60 s) has passed, and never twice."""
    next_hour = START - START % HOUR_MS + HOUR_MS
    rig.observe(KEY, next_hour - 5 * MINUTE_MS)
    clock.set_ms(next_hour + 30_000)
    assert rig.scheduler.run_due(clock.now_ms()) == 0
    clock.set_ms(next_hour + 61_000)
    assert rig.scheduler.run_due(clock.now_ms()) == 1
    assert rig.scheduler.run_due(clock.now_ms()) == 0
    tick = rig.alerts.get_tick(PARITY_RULE.id, next_hour)
    assert tick is not None and len(tick.alert_ids) == 1
    assert rig.sample("pathwatch_alerts_total", rule=PARITY_RULE.id) == 1


def test_no_tick_before_first_start(rig: Rig, clock: FakeClock) -> None:
    """The tick at the top of the hour before the data dir's first start never runs."""
    clock.advance(5)
    rig.scheduler.run_due(clock.now_ms())
    assert rig.alerts.last_tick(PARITY_RULE.id) is None


def test_catch_up_after_downtime_is_bounded(tmp_path: Path, clock: FakeClock) -> None:
    """After 5 hours down with catch_up_max_ticks=3, the newest 3 ticks run (oldest first) and
    2 are skipped and counted; a restart then runs nothing again."""
    rig = Rig(tmp_path / "db", clock, max_ticks=3)
    rig.close()
    clock.advance(5 * 3600 + 120)
    rig = Rig(tmp_path / "db", clock, max_ticks=3)
    assert rig.scheduler.run_due(clock.now_ms()) == 3
    first_hour = START - START % HOUR_MS + HOUR_MS
    assert rig.ticks() == [first_hour + i * HOUR_MS for i in (2, 3, 4)]
    assert rig.sample("pathwatch_skipped_ticks_total", rule=PARITY_RULE.id) == 2
    assert rig.sample("pathwatch_catchup_ticks_total", rule=PARITY_RULE.id) == 3  # all late
    rig.close()
    rig = Rig(tmp_path / "db", clock, max_ticks=3)
    assert rig.scheduler.run_due(clock.now_ms()) == 0
    rig.close()


def test_api_run_and_scheduled_run_share_the_tick(rig: Rig, clock: FakeClock) -> None:
    """A tick first run through the runner (as the API does) is not re-run by the scheduler,
    and running it again returns the recorded alerts."""
    next_hour = START - START % HOUR_MS + HOUR_MS
    rig.observe(KEY, next_hour - MINUTE_MS)
    clock.set_ms(next_hour + 61_000)
    first = rig.runner.run(PARITY_RULE, next_hour)
    assert first.new and len(first.alerts) == 1
    assert rig.scheduler.run_due(clock.now_ms()) == 0
    again = rig.runner.run(PARITY_RULE, next_hour)
    assert not again.new and again.alerts == first.alerts


def test_thirty_day_baseline_in_milliseconds(rig: Rig, clock: FakeClock) -> None:
    """A key seen 30 days + 1 minute before the window is outside the baseline: it alerts
    again; seen 30 days before the window's end (inside the baseline), it does not."""
    t0 = START - START % HOUR_MS
    rig.observe(KEY, t0 + 5 * MINUTE_MS)
    other = (*KEY[:3], "43", "/tmp/y", "y")
    rig.observe(other, t0 + 5 * MINUTE_MS)
    t = t0 + 30 * DAY_MS + HOUR_MS + 6 * MINUTE_MS  # T - 30d = t0 + 1h + 6m ... > first sighting
    clock.set_ms(t - 10 * MINUTE_MS)
    rig.observe(KEY, t - 10 * MINUTE_MS)
    t2 = t0 + 30 * DAY_MS + 5 * MINUTE_MS  # T2 - 30d = t0 + 5m: exactly the sighting, baseline
    clock.set_ms(t + 5 * MINUTE_MS)
    rig.observe(other, t2 - 10 * MINUTE_MS)
    alerts_t = rig.runner.run(PARITY_RULE, t).alerts
    alerts_t2 = rig.runner.run(PARITY_RULE, t2).alerts
    assert [a["fields"]["process.pid"] for a in alerts_t] == ["42"]
    assert [a["fields"]["process.pid"] for a in alerts_t2] == []


def test_alert_log_expiry_keeps_pending_deliveries(rig: Rig, clock: FakeClock) -> None:
    """Expiring the alert log drops old alerts and tick records, never the outbox."""
    next_hour = START - START % HOUR_MS + HOUR_MS
    rig.observe(KEY, next_hour - MINUTE_MS)
    clock.set_ms(next_hour + 61_000)
    rig.runner.run(PARITY_RULE, next_hour)
    assert rig.alerts.alerts_since(0)
    rig.alerts.expire([PARITY_RULE.id], next_hour + 1)
    assert rig.alerts.alerts_since(0) == []
    assert rig.alerts.get_tick(PARITY_RULE.id, next_hour) is None


def test_key_count_is_exact_across_writes_expiry_and_restart(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The per-rule key count follows creations and expiry and survives a reopen."""
    rig = Rig(tmp_path / "db", clock)
    for pid in range(5):
        rig.observe((*KEY[:3], str(pid), "/bin/x", "x"), START)
    rig.observe((*KEY[:3], "0", "/bin/x", "x"), START + MINUTE_MS)  # not new
    assert rig.firstseen.key_count(PARITY_RULE.id) == 5
    rig.close()
    rig = Rig(tmp_path / "db", clock)
    assert rig.firstseen.key_count(PARITY_RULE.id) == 5
    clock.set_ms(START + 40 * DAY_MS)
    rig.firstseen.expire(PARITY_RULE.id, retention_of(PARITY_RULE, 256), clock.now_ms())
    assert rig.firstseen.key_count(PARITY_RULE.id) == 0
    rig.close()
