"""The tick's late check reads what it must and decides what the key-by-key check decided.

The runner settles the late keyspace (keys that got minutes inside windows of ticks that had
already run) by reading records in batches, skipping the records of entries whose onsets
belong to ticks after the one being run, and deleting the entries it read without reading
them again when no write has listed late minutes since. Whatever the history and arrival
order, its late findings must be those of the straightforward check: each entry's key read
with `get`, its onsets found by `late_findings`, those alerted at their tick left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pathwatch.app.service import retention_of
from pathwatch.clock import HOUR_MS, MINUTE_MS, FakeClock
from pathwatch.engine.evaluate import Finding, evaluate, late_findings
from pathwatch.observations import Sighting
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.rules.model import Exclusion
from pathwatch.scheduler import TickRunner
from pathwatch.scheduler.scheduler import next_tick
from pathwatch.store import AlertStore, Database, FirstSeenStore
from pathwatch.store import keyspace as ks
from pathwatch.store.codec import encode_key
from pathwatch.store.extend import item_of
from pathwatch.store.writer import IngestWriter, TickWatermarks
from pathwatch.telemetry.metrics import Metrics

START = 1_800_000_000_000 - 1_800_000_000_000 % HOUR_MS  # a whole hour
RULE = replace(
    PARITY_RULE,
    no_baseline="alert",
    delay_seconds=0,
    exclude=(Exclusion("process.executable.path", "value", "/usr/bin/noisy"),),
)
KEYS = [
    ("node-a", "prod", "node-a", "100", "/tmp/x", "x"),
    ("node-a", "prod", "node-a", "101", "/usr/bin/noisy", "noisy"),
    ("node-b", "prod", "node-b", "200", "/opt/y", "y"),
    ("node-b", "prod", "node-b", "201", "/bin/sh", "sh"),
]


class Rig:
    """The service's wiring of store, writer, runner and watermarks, without the network."""

    def __init__(self, path: Path, clock: FakeClock) -> None:
        self.db = Database(str(path))
        self.clock = clock
        self.firstseen = FirstSeenStore(self.db)
        self.alerts = AlertStore(self.db)
        self.watermarks = TickWatermarks()
        self.retention = {RULE.id: retention_of(RULE, 256, HOUR_MS)}
        self.firstseen.prepare_onsets(RULE.id, self.retention[RULE.id].onset_gap_minutes, 0)
        self.writer = IngestWriter(
            self.firstseen, lambda: self.retention, clock, Metrics(), watermarks=self.watermarks
        )
        self.writer.start()
        self.runner = TickRunner(
            self.firstseen,
            self.alerts,
            [],
            clock,
            Metrics(),
            outbox_depth=lambda _: 0,
            ledger=self.firstseen,
            watermarks=self.watermarks,
            next_tick=next_tick,
        )

    def observe(self, key: tuple[str, ...], at_ms: int) -> None:
        s = Sighting()
        s.add(at_ms)
        ticket = self.writer.submit({(RULE.id, key): s}, sender="collector")
        assert ticket.wait(10) and ticket.error is None

    def tick(self, tick_ms: int) -> list[dict[str, Any]]:
        self.clock.set_ms(max(self.clock.now_ms(), tick_ms))
        return self.runner.run(RULE, tick_ms).alerts

    def close(self) -> None:
        self.writer.shutdown(10)
        self.db.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path / "db", FakeClock(START))
    yield r
    r.close()


def key_by_key(rig: Rig, tick_ms: int, on_time: list[Finding]) -> list[Finding]:
    """The late findings as the runner decided them entry by entry, before batched reads."""
    store = rig.firstseen
    alerted: dict[int, set[tuple[str, ...]]] = {tick_ms: {f.key for f in on_time}}
    out = []
    for raw_key, value in store.late_entries(RULE.id):
        key, since = store.decode_late(RULE.id, raw_key, value)
        state = store.get(RULE.id, key)
        if state is None:
            continue
        for finding in late_findings(
            RULE, key, state, since, tick_ms, lambda m: next_tick(RULE.schedule, m * MINUTE_MS)
        ):
            if key not in rig.runner._alerted_at(RULE, finding.tick_ms, alerted):
                out.append(finding)
    return out


# Ticks run while points arrive (minutes after START): hourly, and some between hours (the API).
TICKS = (60, 120, 150, 180, 220, 240)
_point = st.tuples(
    st.integers(min_value=0, max_value=len(KEYS) - 1),
    st.integers(min_value=0, max_value=6 * 60 - 1),  # minute after START - 2 h
    st.integers(min_value=0, max_value=len(TICKS)),  # how many of TICKS ran before it arrived
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    points=st.lists(_point, min_size=1, max_size=12),
    at=st.sampled_from([240, 249, 299, 300, 210, 230, 235]),
)
def test_late_findings_are_those_of_the_key_by_key_check(
    tmp_path_factory: Any, points: list[tuple[int, int, int]], at: int
) -> None:
    """Ticks run while points keep arriving, some stamped inside windows of ticks that
    had run; then a tick (on the hour or between hours, through the API) settles the late
    entries: the same findings as the key-by-key check, and every entry consumed."""
    clock = FakeClock(START)
    rig = Rig(tmp_path_factory.mktemp("db"), clock)
    try:
        base = START - 2 * HOUR_MS
        ran: set[int] = set()
        for key, minute, ticks_before in sorted(points, key=lambda p: p[2]):
            for minutes in TICKS[:ticks_before]:
                if START + minutes * MINUTE_MS not in ran:
                    rig.tick(START + minutes * MINUTE_MS)
                    ran.add(START + minutes * MINUTE_MS)
            stamp = base + minute * MINUTE_MS + 1000
            clock.set_ms(max(clock.now_ms(), stamp + 1000))
            rig.observe(KEYS[key], stamp)
        tick = START + at * MINUTE_MS
        if tick in ran or rig.alerts.get_tick(RULE.id, tick) is not None:
            return
        clock.set_ms(max(clock.now_ms(), tick))
        on_time = evaluate(RULE, tick, rig.firstseen).findings
        expected = key_by_key(rig, tick, on_time)
        late, seen = rig.runner._late(RULE, tick, on_time)
        assert [(f.key, f.tick_ms, f.first_minute, f.late) for f in late] == [
            (f.key, f.tick_ms, f.first_minute, f.late) for f in expected
        ]
        assert seen == rig.firstseen.late_entries(RULE.id)
        rig.runner.run(RULE, tick)
        assert rig.firstseen.late_entries(RULE.id) == []
    finally:
        rig.close()


def test_no_record_is_read_for_an_onset_whose_tick_is_still_ahead(rig: Rig) -> None:
    """A tick run between hours (through the API) reads no record for a late onset that
    belongs to the next hourly tick: that tick's window holds it and is evaluated on time."""
    hour = START + 5 * HOUR_MS
    rig.tick(hour + 20 * MINUTE_MS)  # a tick between hours: the watermark
    rig.clock.set_ms(hour + 25 * MINUTE_MS)
    rig.observe(KEYS[0], hour + 10 * MINUTE_MS)  # late for that tick, in the next hour's window
    assert len(rig.firstseen.late_entries(RULE.id)) == 1
    reads: list[bytes] = []
    get_many = rig.db.get_many

    def counting(keys: list[bytes]) -> list[bytes | None]:
        reads.extend(keys)
        return get_many(keys)

    rig.db.get_many = counting  # type: ignore[method-assign]
    late, seen = rig.runner._late(RULE, hour + 30 * MINUTE_MS, [])
    record = ks.record_key(RULE.id, encode_key(KEYS[0]))
    assert (late, len(seen), record in reads) == ([], 1, False)
    # The hourly tick itself alerts the key on time.
    rig.db.get_many = get_many  # type: ignore[method-assign]
    assert [a["fields"]["process.executable.path"] for a in rig.tick(hour + HOUR_MS)] == ["/tmp/x"]


def test_late_states_read_what_get_reads(tmp_path: Path) -> None:
    """Batched reads (more than one batch) give each stored key the state `get` gives it,
    logged minutes included, in the order asked; keys no longer stored are left out."""
    db = Database(str(tmp_path / "db"))
    try:
        store = FirstSeenStore(db)
        retention = {RULE.id: retention_of(RULE, 256, 0)}
        now = START
        batch = {}
        keys = [("n", "c", "n", str(pid), f"/bin/p{pid % 7}", "p") for pid in range(1500)]
        for i, key in enumerate(keys):
            s = Sighting()
            s.add(now - (i % 90) * MINUTE_MS)
            batch[(RULE.id, key)] = s
        store.apply(batch, retention, now)
        logged = keys[::5]
        store.pending.add_many([item_of((RULE.id, k)) for k in logged], now // MINUTE_MS + 1, now)
        gone = ("n", "c", "n", "999999", "/bin/gone", "gone")  # never stored, no logged minute
        only_logged = ("n", "c", "n", "888888", "/bin/new", "new")  # logged minutes only
        store.pending.add_many([item_of((RULE.id, only_logged))], now // MINUTE_MS + 1, now)
        asked = [*keys[:700], gone, only_logged, *keys[700:]]
        entries = [(ks.late_key(RULE.id, encode_key(k)), i) for i, k in enumerate(asked)]
        got = list(store.late_states(RULE.id, entries))
        want = [
            (raw, i, store.get(RULE.id, k))
            for (raw, i), k in zip(entries, asked, strict=True)
            if k != gone
        ]
        assert got == want
        assert [store.late_key(RULE.id, raw) for raw, _, _ in got] == [
            k for k in asked if k != gone
        ]
    finally:
        db.close()


def test_entries_listed_again_after_the_read_stay_listed(tmp_path: Path) -> None:
    """`late_unchanged` with the generation read before the entries: every entry when no
    write listed late minutes since (nothing read again), and without the ones a later write
    listed again (their value changed) when one did."""
    db = Database(str(tmp_path / "db"))
    try:
        store = FirstSeenStore(db)
        retention = {RULE.id: retention_of(RULE, 256, 0)}
        tick = START + 5 * HOUR_MS
        now = tick + 10 * MINUTE_MS
        marks = {RULE.id: tick}

        def late_point(key: tuple[str, ...], minute: int) -> None:
            s = Sighting()
            s.add(tick - minute * MINUTE_MS)
            store.apply({(RULE.id, key): s}, retention, now, watermarks=marks)

        late_point(KEYS[0], 30)
        late_point(KEYS[2], 30)
        generation = store.late_generation
        entries = store.late_entries(RULE.id)
        assert len(entries) == 2
        assert store.late_unchanged(entries, generation) == [k for k, _ in entries]
        late_point(KEYS[3], 20)  # a late write for another key: its entry is new
        assert store.late_generation != generation
        assert store.late_unchanged(entries, generation) == [k for k, _ in entries]
        late_point(KEYS[0], 40)  # listed again: its value changed since it was read
        changed = ks.late_key(RULE.id, encode_key(KEYS[0]))
        unchanged = [k for k, _ in entries if k != changed]
        assert store.late_unchanged(entries, generation) == unchanged
        assert store.late_unchanged(entries) == unchanged
    finally:
        db.close()
