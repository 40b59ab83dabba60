"""Trust in time: backdated points cannot hide a key; late data is alerted, once, never lost.

Store, tick runner and scheduler together on a real RocksDB with time injected, wired the way
the service wires them (shared tick watermarks, the first-seen store as the late ledger).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pathwatch.alerts.context import Explainer
from pathwatch.app.service import retention_of
from pathwatch.clock import DAY_MS, HOUR_MS, MINUTE_MS, FakeClock
from pathwatch.observations import Sighting
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.scheduler import TickRunner
from pathwatch.scheduler.runner import TickNotReady
from pathwatch.scheduler.scheduler import next_tick
from pathwatch.store import AlertStore, Database, FirstSeenStore
from pathwatch.store.writer import IngestWriter, TickWatermarks
from pathwatch.telemetry.metrics import Metrics

START = 1_800_000_000_000 - 1_800_000_000_000 % HOUR_MS  # a whole hour
IMPLANT = ("node-victim", "prod", "node-victim", "31337", "/tmp/.x/kworkerd", "kworkerd")
LATENESS_MS = HOUR_MS
RULE = replace(PARITY_RULE, no_baseline="alert")  # every data dir here is a fresh install


class Rig:
    """The service's wiring of store, runner and watermarks, without the network."""

    def __init__(self, path: Path, clock: FakeClock, lateness_ms: int = LATENESS_MS) -> None:
        self.db = Database(str(path))
        self.clock = clock
        self.firstseen = FirstSeenStore(self.db)
        self.alerts = AlertStore(self.db)
        self.metrics = Metrics()
        self.watermarks = TickWatermarks()
        self.retention = {RULE.id: retention_of(RULE, 256, lateness_ms)}
        self.firstseen.prepare_onsets(RULE.id, self.retention[RULE.id].onset_gap_minutes, 0)
        self.writer = IngestWriter(
            self.firstseen,
            lambda: self.retention,
            clock,
            self.metrics,
            watermarks=self.watermarks,
        )
        self.writer.start()
        self.runner = TickRunner(
            self.firstseen,
            self.alerts,
            [],
            clock,
            self.metrics,
            outbox_depth=lambda _: 0,
            explainer=Explainer(self.firstseen.context, self.firstseen.entity_first_seen),
            ledger=self.firstseen,
            watermarks=self.watermarks,
            next_tick=next_tick,
        )

    def observe(self, key: tuple[str, ...], at_ms: int) -> None:
        """One point stamped `at_ms`, arriving now (the clock)."""
        s = Sighting()
        s.add(at_ms)
        ticket = self.writer.submit({(RULE.id, key): s}, sender="collector")
        assert ticket.wait(10) and ticket.error is None

    def tick(self, tick_ms: int) -> list[dict[str, Any]]:
        """Run the tick as the scheduler would: once its delay has passed."""
        ready = tick_ms + int(RULE.delay_seconds * 1000)
        if self.clock.now_ms() < ready:
            self.clock.set_ms(ready)
        return self.runner.run(RULE, tick_ms).alerts

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.writer.shutdown(10)
        self.db.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def rig(tmp_path: Path, clock: FakeClock) -> Iterator[Rig]:
    r = Rig(tmp_path / "db", clock)
    yield r
    r.close()


def _keys(alerts: list[dict[str, Any]]) -> list[str]:
    return [a["fields"]["process.executable.path"] for a in alerts if "fields" in a]


def test_backdated_point_does_not_hide_an_implant(rig: Rig, clock: FakeClock) -> None:
    """Finding 1: the attacker exports the implant's key stamped 10 days ago; the collector's
    real observation still alerts at the next tick, and the context says the earlier history
    arrived late."""
    tick = START + 2 * HOUR_MS
    clock.set_ms(tick - 30 * MINUTE_MS)
    rig.observe(IMPLANT, clock.now_ms() - 10 * DAY_MS)  # the forged baseline
    rig.observe(IMPLANT, clock.now_ms() - 10_000)  # the real exec, on time
    alerts = rig.tick(tick)
    real = [a for a in alerts if not a.get("late")]
    assert _keys(real) == [IMPLANT[4]]
    assert real[0]["context"]["earlier_history_late"] is True
    assert "arrived late" in real[0]["context"]["summary"]
    assert rig.sample("pathwatch_late_observations_total", outcome="untrusted") == 1


def test_the_reference_trusts_every_timestamp(tmp_path: Path, clock: FakeClock) -> None:
    """max_baseline_lateness 0s is the reference search: a point ten days old is baseline."""
    rig = Rig(tmp_path / "db", clock, lateness_ms=0)
    try:
        tick = START + 2 * HOUR_MS
        clock.set_ms(tick - 30 * MINUTE_MS)
        rig.observe(IMPLANT, clock.now_ms() - 10 * DAY_MS)
        rig.observe(IMPLANT, clock.now_ms() - 10_000)
        assert rig.tick(tick) == []
    finally:
        rig.close()


def test_on_time_point_makes_an_untrusted_minute_trusted(rig: Rig, clock: FakeClock) -> None:
    """A minute first seen late and then seen on time is trusted baseline."""
    clock.set_ms(START + HOUR_MS)
    minute = START - 2 * HOUR_MS
    rig.observe(IMPLANT, minute)  # 3 h late: untrusted
    state = rig.firstseen.get(RULE.id, IMPLANT)
    assert state is not None and state.untrusted.observed(
        minute // MINUTE_MS, minute // MINUTE_MS + 1
    )
    clock.set_ms(minute + 10 * MINUTE_MS)  # an honest replay of the same minute, on time
    rig.observe(IMPLANT, minute + 1000)
    state = rig.firstseen.get(RULE.id, IMPLANT)
    assert state is not None and not state.untrusted.runs


def test_evaluation_before_the_delay_is_refused(rig: Rig, clock: FakeClock) -> None:
    """Finding 4: a tick cannot be recorded before its window plus the rule's delay passed."""
    tick = START + HOUR_MS
    clock.set_ms(tick + 2000)
    with pytest.raises(TickNotReady, match="can run from"):
        rig.runner.run(RULE, tick)
    assert rig.alerts.get_tick(RULE.id, tick) is None


def test_point_arriving_after_its_tick_alerts_at_the_next_tick(rig: Rig, clock: FakeClock) -> None:
    """Finding 4: a point stamped T-20 s that arrives after the tick at T ran is alerted at the
    next tick, with the id the on-time alert would have had, marked late; once, not per tick."""
    tick = START + HOUR_MS
    assert rig.tick(tick) == []
    clock.set_ms(tick + 90_000)
    rig.observe(IMPLANT, tick - 20_000)
    assert rig.sample("pathwatch_late_observations_total", outcome="after_tick") == 1
    alerts = rig.tick(tick + HOUR_MS)
    assert _keys(alerts) == [IMPLANT[4]]
    late = alerts[0]
    assert late["late"] is True
    assert late["window"]["end"] == _iso(tick)

    # The id is the one the on-time evaluation gives: a fresh store that got the point in
    # time alerts the same id at T.
    assert late["id"] == _on_time_id(clock, tick, tick - 20_000)
    assert rig.tick(tick + 2 * HOUR_MS) == []
    assert rig.sample("pathwatch_late_alerts_total", rule=RULE.id) == 1


def test_queue_drained_after_an_outage_raises_each_onset_once(rig: Rig, clock: FakeClock) -> None:
    """A collector's queue drains three hours of points after the ticks ran: the process that
    started during the outage alerts once (at the tick of its onset), not once per tick."""
    for h in range(1, 4):
        rig.tick(START + h * HOUR_MS)
    clock.set_ms(START + 3 * HOUR_MS + 5 * MINUTE_MS)
    for minute in range(0, 3 * 60, 1):
        rig.observe(IMPLANT, START + minute * MINUTE_MS + 5000)
    alerts = rig.tick(START + 4 * HOUR_MS)
    late = [a for a in alerts if a.get("late")]
    assert len(late) == 1
    assert late[0]["window"]["end"] == _iso(START + HOUR_MS)
    assert rig.tick(START + 5 * HOUR_MS) == []


def test_late_point_already_alerted_on_time_is_not_alerted_again(
    rig: Rig, clock: FakeClock
) -> None:
    """A late point earlier in a window whose tick alerted the key raises no second alert."""
    tick = START + HOUR_MS
    clock.set_ms(tick - 10 * MINUTE_MS)
    rig.observe(IMPLANT, tick - 10 * MINUTE_MS)
    assert _keys(rig.tick(tick)) == [IMPLANT[4]]
    clock.set_ms(tick + 5 * MINUTE_MS)
    rig.observe(IMPLANT, tick - 50 * MINUTE_MS)  # earlier in the same window, after the tick
    assert rig.tick(tick + HOUR_MS) == []


def _iso(ms: int) -> str:
    from pathwatch.alerts.event import rfc3339

    return rfc3339(ms)


def _on_time_id(clock: FakeClock, tick: int, at_ms: int) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        other_clock = FakeClock(at_ms + 1000)
        other = Rig(Path(d) / "db", other_clock)
        try:
            other.observe(IMPLANT, at_ms)
            (alert,) = other.tick(tick)
            return str(alert["id"])
        finally:
            other.close()


# -- the rule with trust, against a brute-force model -----------------------------------------

_observation = st.tuples(
    st.integers(min_value=0, max_value=40 * 24 * 60),  # minute offset before the tick
    st.integers(min_value=0, max_value=3 * 60),  # arrival delay after the point, minutes
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(observations=st.lists(_observation, min_size=1, max_size=8))
def test_rule_with_trust_matches_the_model(tmp_path_factory: Any, observations: Any) -> None:
    """At a tick, a key alerts (on time or late, once) iff it has an observation in the window
    and no on-time observation in the baseline, for any order of arrival."""
    tick = START + 45 * DAY_MS
    rule = replace(RULE, delay_seconds=0)
    points = sorted(
        ((tick - 1 - off * MINUTE_MS, tick - 1 - off * MINUTE_MS + delay * MINUTE_MS)
         for off, delay in observations),
        key=lambda p: p[1],
    )  # fmt: skip
    clock = FakeClock(START)
    rig = Rig(tmp_path_factory.mktemp("db"), clock)
    try:
        for at_ms, arrival in points:
            if arrival > tick:
                continue
            clock.set_ms(max(clock.now_ms(), arrival))
            rig.observe(IMPLANT, at_ms)
        clock.set_ms(max(clock.now_ms(), tick))
        alerted = rig.runner.run(rule, tick).alerts
        window = (tick - HOUR_MS, tick)
        baseline = (tick - 30 * DAY_MS, tick - HOUR_MS)
        kept = [(a, r) for a, r in points if r <= tick]
        in_window = any(window[0] <= a < window[1] for a, _ in kept)
        trusted_before = any(
            baseline[0] <= a < baseline[1] and (r - (a // MINUTE_MS + 1) * MINUTE_MS) < HOUR_MS
            for a, r in kept
        )
        assert bool(alerted) == (in_window and not trusted_before), (kept, alerted)
    finally:
        rig.close()


def test_stream_mode_cannot_be_poisoned_before_the_exec(tmp_path: Path) -> None:
    """Finding 1, stream mode: a (host, path) backdated by the attacker before the exec still
    raises a stream hit when the collector reports the real process."""
    db = Database(str(tmp_path / "db"))
    try:
        store = FirstSeenStore(db)
        retention = {RULE.id: replace(retention_of(RULE, 256, LATENESS_MS), stream=True)}
        now = START + 40 * DAY_MS
        forged, real = Sighting(), Sighting()
        forged.add(now - 5 * DAY_MS)
        store.apply({(RULE.id, IMPLANT): forged}, retention, now)
        real.add(now - 5000)
        result = store.apply({(RULE.id, IMPLANT): real}, retention, now)
        assert [hit.key for hit in result.stream_hits] == [IMPLANT]
    finally:
        db.close()


def test_only_late_onsets_within_reach_are_listed(rig: Rig, clock: FakeClock) -> None:
    """History sent over OTLP after ticks ran lists one entry per key (its onset), not one per
    minute, and nothing older than evaluation reaches: the next tick re-reads only those."""
    from pathwatch.store import keyspace as ks

    tick = START + 10 * 86_400_000
    rig.tick(tick)
    clock.set_ms(tick + 5 * MINUTE_MS)
    for minute in range(30):  # a running process, backfilled minute by minute
        rig.observe(IMPLANT, tick - 2 * HOUR_MS + minute * MINUTE_MS)
    old = ("node-old", "prod", "node-old", "1", "/usr/bin/old", "old")
    rig.observe(old, tick - 9 * 86_400_000)  # beyond the activity index's reach
    listed = list(rig.db.scan_prefix(ks.late_prefix(RULE.id)))
    assert len(listed) == 1
    assert rig.sample("pathwatch_late_observations_total", outcome="after_tick") == 31


def test_a_tick_between_hours_and_a_late_onset_name_one_alert(rig: Rig, clock: FakeClock) -> None:
    """A tick run at 9 past (through the API) whose window overlaps the hourly tick of a late
    onset records that occurrence once, not once on time and once late (one id, one delivery)."""
    hour = START + 5 * HOUR_MS
    rig.tick(hour)
    clock.set_ms(hour + 5 * MINUTE_MS)
    rig.observe(IMPLANT, hour - 30 * MINUTE_MS)  # in the hour's window, after its tick ran
    alerts = rig.tick(hour + 9 * MINUTE_MS)  # window [hour - 51 min, hour + 9 min)
    assert [a["id"] for a in alerts] == [_on_time_id(clock, hour, hour - 30 * MINUTE_MS)]
