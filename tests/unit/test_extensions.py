"""Logged minutes (store/extend.py) change nothing but speed, survive a crash, and go away.

Two pipelines over two real RocksDB stores take the same scrapes: one with the receiver's
fast path and the extension log (minutes right after a stored one are logged, folded later,
folded in random chunks, the store reopened at random without folding), one through the full
path only. Whatever the scrapes (a minute boundary, gaps, backdated minutes, points past the
trusted lateness or inside windows of ticks that already ran, several timestamps in one
request), every read must see the same state, and once folded the records must be the same.
"""

from __future__ import annotations

import struct
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from pathwatch.clock import MINUTE_MS, FakeClock
from pathwatch.observations import Extension, Sighting
from pathwatch.receiver.decode import Decoder, DecodeResult, TimeBounds
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.store import keyspace as ks
from pathwatch.store.db import Database, DatabaseOptions
from pathwatch.store.durable import DurableResources
from pathwatch.store.extend import LOG_PREFIX, decode_entry, encode_entry, item_of, rule_key_of
from pathwatch.store.firstseen import FirstSeenStore, Retention
from pathwatch.store.writer import IngestWriter, WriterConfig
from pathwatch.telemetry.metrics import Metrics
from tests.support import wait_until

MINUTE0 = 29_000_000
NOW = (MINUTE0 + 30) * MINUTE_MS
BOUNDS = TimeBounds(oldest_ms=(MINUTE0 - 60) * MINUTE_MS, newest_ms=NOW + 5 * MINUTE_MS)
RULE = PARITY_RULE.id


def retention(lateness_minutes: int = 0) -> dict[str, Retention]:
    return {
        RULE: Retention(
            horizon_minutes=PARITY_RULE.horizon_minutes,
            lateness_ms=lateness_minutes * MINUTE_MS,
            onset_gap_minutes=PARITY_RULE.baseline_minutes - PARITY_RULE.window_minutes,
        )
    }


def _attr(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def scrape(procs: list[int], minute: int, seconds: list[int], empty: tuple[int, ...] = ()) -> bytes:
    """One node's scrape: processes `procs` with points at `seconds` into `minute` (offset
    from MINUTE0); processes in `empty` are sent without any data point."""
    req = ExportMetricsServiceRequest()
    for p in procs:
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(
            [
                _attr("process.pid", 100 + p),
                _attr("process.executable.name", f"p{p % 4}"),
                _attr("process.executable.path", f"/bin/p{p % 4}"),
                _attr("host.name", "node-1"),
                _attr("k8s.cluster.name", "prod"),
                _attr("k8s.node.name", "node-1"),
            ]
        )
        m = rm.scope_metrics.add().metrics.add(name="process.memory.usage")
        if p in empty:
            continue
        for s in seconds:
            t = ((MINUTE0 + minute) * 60 + s) * 1000
            m.gauge.data_points.add(time_unix_nano=t * 1_000_000, as_int=1)
    return req.SerializeToString()


class Pipeline:
    def __init__(self, path: str, fast: bool) -> None:
        self.path = path
        self.fast = fast
        self.durable = DurableResources(1000) if fast else None
        self.decoder = Decoder([PARITY_RULE], durable=self.durable)
        self._open()

    def _open(self) -> None:
        self.db = Database(self.path, DatabaseOptions(fsync=False))
        self.store = FirstSeenStore(self.db)
        self.store.load_pending()

    def reopen(self) -> None:
        """A crash: nothing folded, memory lost; the log is read back."""
        self.db.close()
        if self.durable is not None:
            self.durable.clear()
        self._open()

    def export(
        self, data: bytes, ret: dict[str, Retention], watermark_ms: int = 0
    ) -> tuple[DecodeResult, int]:
        result = self.decoder.decode(data, BOUNDS)
        exts = [result.extension] if result.extension is not None else []
        applied = self.store.apply(
            result.batch, ret, NOW, watermarks={RULE: watermark_ms}, extensions=exts
        )
        if self.durable is not None:
            marks = [*result.marks, *applied.extension_marks]
            self.durable.add(self.store.durable_entries(marks, applied.states))
            for value, fingerprints in applied.extended:
                self.durable.refresh(fingerprints, value)
        return result, applied.late_after_tick + applied.late_untrusted

    def stored(self) -> dict[object, object]:
        return dict(self.store.scan(RULE))

    def late_listed(self) -> list[tuple[object, int]]:
        return sorted(self.store.decode_late(RULE, k, v) for k, v in self.store.late_entries(RULE))


step = st.tuples(
    st.one_of(  # processes: mostly the node's usual ones
        st.just([0, 1, 2, 3, 4, 5]),
        st.just([0, 1, 2, 3, 4, 5]),
        st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True),
    ),
    st.sampled_from([1, 1, 1, 1, 0, 2, -1, -3, 3]),  # minute move from the previous scrape
    st.sampled_from([[7], [7], [7], [3, 41]]),  # seconds: mostly one timestamp
    st.sampled_from(["", "", "", "fold", "reopen", "empty"]),
)


ALL = [0, 1, 2, 3, 4, 5]


@settings(derandomize=True, database=None, deadline=None, max_examples=120)
# A logged minute, then a full write of that minute with a later point: last_seen must stay
# what the first write of the minute gave it, as when the logged minute had been written.
@example(
    steps=[(ALL, 1, [7], ""), (ALL, 1, [7], ""), (ALL, -1, [7], "empty"), (ALL, 1, [3, 41], "")],
    lateness=0,
    watermark=0,
)
@given(
    steps=st.lists(step, min_size=1, max_size=14),
    lateness=st.sampled_from([0, 0, 12]),
    watermark=st.sampled_from([0, 0, MINUTE0 + 8]),
)
def test_logged_minutes_read_and_fold_exactly_as_written_ones(
    steps: list[tuple[list[int], int, list[int], str]], lateness: int, watermark: int
) -> None:
    ret = retention(lateness)
    wm = watermark * MINUTE_MS
    with tempfile.TemporaryDirectory() as tmp:
        fast = Pipeline(str(Path(tmp) / "fast"), fast=True)
        full = Pipeline(str(Path(tmp) / "full"), fast=False)
        try:
            minute = 5
            for procs, move, seconds, action in steps:
                minute = max(0, min(25, minute + move))
                empty = (procs[0],) if action == "empty" else ()
                data = scrape(procs, minute, seconds, empty)
                (a, late_a), (b, late_b) = fast.export(data, ret, wm), full.export(data, ret, wm)
                assert a.points_accepted == b.points_accepted
                assert late_a == late_b
                assert fast.stored() == full.stored()
                assert fast.late_listed() == full.late_listed()
                if action == "fold":
                    fast.store.fold(2, ret, NOW)
                elif action == "reopen":
                    fast.reopen()
                assert fast.stored() == full.stored()
            fast.store.fold_all(ret, NOW)
            assert not fast.store.pending
            assert not list(fast.db.scan_prefix(LOG_PREFIX))
            assert fast.stored() == full.stored()
            fast.reopen()
            assert fast.stored() == full.stored()
        finally:
            fast.db.close()
            full.db.close()


def test_a_minute_boundary_is_logged_read_back_after_a_crash_and_folded(tmp_path: Path) -> None:
    pipe = Pipeline(str(tmp_path / "db"), fast=True)
    ret = retention()
    procs = list(range(6))
    try:
        for minute in (0, 1):  # a new process, then a running one: its keys are kept
            first, _ = pipe.export(scrape(procs, minute, [7]), ret)
            assert len(first.batch) == 6 and first.extension is None
        for minute in (2, 3):
            result, _ = pipe.export(scrape(procs, minute, [7]), ret)
            assert not result.batch and result.extension is not None  # nothing decoded
            assert len(result.extension) == 6
        records = [v for _, v in pipe.db.scan_prefix(ks.record_prefix(RULE))]
        logged = list(pipe.db.scan_prefix(LOG_PREFIX))
        assert len(logged) == 2 and len(pipe.store.pending) == 6
        pipe.reopen()  # kill -9: the records were never rewritten
        assert [v for _, v in pipe.db.scan_prefix(ks.record_prefix(RULE))] == records
        key = ("node-1", "prod", "node-1", "100", "/bin/p0", "p0")
        state = pipe.store.get(RULE, key)
        assert state is not None and state.history.runs == ((MINUTE0, MINUTE0 + 4),)
        assert state.last_seen_ms == ((MINUTE0 + 3) * 60 + 7) * 1000
        pipe.store.fold_all(ret, NOW)
        assert not list(pipe.db.scan_prefix(LOG_PREFIX))
        pipe.reopen()
        assert not pipe.store.pending
        again = pipe.store.get(RULE, key)
        assert again == state
    finally:
        pipe.db.close()


def test_a_late_minute_boundary_is_written_untrusted_not_logged(tmp_path: Path) -> None:
    """Past the trusted lateness, a minute must be marked untrusted: the full write does it."""
    pipe = Pipeline(str(tmp_path / "db"), fast=True)
    ret = retention(lateness_minutes=20)  # minutes before MINUTE0 + 10 are late at NOW
    try:
        pipe.export(scrape([0, 1], 2, [7]), retention())  # trusted (lateness off then)
        pipe.export(scrape([0, 1], 3, [7]), retention())
        result, late = pipe.export(scrape([0, 1], 4, [7]), ret)
        assert result.extension is not None  # the receiver vouches; the store decides
        assert late == 2 and not pipe.store.pending
        state = pipe.store.get(RULE, ("node-1", "prod", "node-1", "100", "/bin/p0", "p0"))
        assert state is not None and state.untrusted.runs == ((MINUTE0 + 4, MINUTE0 + 5),)
        assert state.history.runs == ((MINUTE0 + 2, MINUTE0 + 5),)
    finally:
        pipe.db.close()


def test_a_resource_sent_without_points_is_no_observation(tmp_path: Path) -> None:
    pipe = Pipeline(str(tmp_path / "db"), fast=True)
    ret = retention()
    try:
        pipe.export(scrape([0, 1, 2, 3, 4], 0, [7]), ret)
        pipe.export(scrape([0, 1, 2, 3, 4], 1, [7]), ret)
        result, _ = pipe.export(scrape([0, 1, 2, 3, 4], 2, [7], empty=(0,)), ret)
        assert result.extension is not None and len(result.extension) == 4
        state = pipe.store.get(RULE, ("node-1", "prod", "node-1", "100", "/bin/p0", "p0"))
        assert state is not None and state.history.runs == ((MINUTE0, MINUTE0 + 2),)
    finally:
        pipe.db.close()


def test_expiry_keeps_a_key_whose_minutes_are_logged(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "db"), DatabaseOptions(fsync=False))
    store = FirstSeenStore(db)
    short = {RULE: Retention(horizon_minutes=3 * 1440)}
    key = ("node-1", "prod", "node-1", "100", "/bin/p0", "p0")
    t0 = MINUTE0 * MINUTE_MS
    try:
        store.apply({(RULE, key): Sighting({MINUTE0}, t0, t0)}, short, t0)
        ext = Extension(t0 + MINUTE_MS, ((1, (item_of((RULE, key)),)),))
        assert store.apply({}, short, t0 + MINUTE_MS, extensions=[ext]).keys_extended == 1
        # Four days on, the record alone looks expired; its logged minute is not folded yet
        # (an expiry interval shorter than the fold's): the key stays.
        assert store.expire(RULE, short[RULE], t0 + 4 * 86_400_000 + 2 * MINUTE_MS) == 0
        assert store.get(RULE, key) is not None
    finally:
        db.close()


@given(
    st.integers(0, 2**62),
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=8).filter(lambda r: "\x00" not in r),
            st.lists(st.text(max_size=6), min_size=1, max_size=4).map(tuple),
        ),
        max_size=6,
    ),
)
def test_log_entries_round_trip_any_key(
    time_ms: int, keys: list[tuple[str, tuple[str, ...]]]
) -> None:
    """Fields holding NUL (valid UTF-8) or lone surrogates (escaped bytes) survive too."""
    decoded_ms, items = decode_entry(encode_entry(time_ms, list(map(item_of, keys))))
    assert (decoded_ms, [rule_key_of(i) for i in items]) == (time_ms, keys)


def _entry_v1(time_ms: int, items: list[bytes]) -> bytes:
    """A log entry as the first format wrote it: each item length-prefixed, zlib."""
    body = b"".join(struct.pack(">H", len(item)) + item for item in items)
    return struct.pack(">Q", time_ms) + zlib.compress(body, 1)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**63 - 1), st.lists(st.binary(max_size=300), max_size=40))
def test_log_entries_of_the_first_format_still_decode(time_ms: int, items: list[bytes]) -> None:
    """A log left by the previous version is replayed after an upgrade; both formats give
    the same items, and the current one is what `encode_entry` writes."""
    assert decode_entry(_entry_v1(time_ms, items)) == (time_ms, items)
    current = encode_entry(time_ms, items)
    assert current != _entry_v1(time_ms, items)
    assert decode_entry(current) == (time_ms, items)


def test_a_log_entry_whose_lengths_do_not_match_is_refused() -> None:
    entry = encode_entry(5, [b"abc", b"de"])
    body = zlib.decompress(entry[9:])
    bad = entry[:9] + zlib.compress(body[:-1], 1)
    with pytest.raises(ValueError, match="lengths"):
        decode_entry(bad)


class TestWriterFolds:
    """The writer's fold schedule, with a fake clock (store/writer.py)."""

    KEY = ("node-1", "prod", "node-1", "100", "/bin/p0", "p0")

    def _writer(self, tmp_path: Path, clock: FakeClock) -> tuple[IngestWriter, FirstSeenStore]:
        db = Database(str(tmp_path / "db"), DatabaseOptions(fsync=False))
        store = FirstSeenStore(db)
        ret = retention()
        writer = IngestWriter(store, lambda: ret, clock, Metrics(),
                              WriterConfig(fold_interval_s=600.0))  # fmt: skip
        writer.start()
        t = clock.now_ms() - 30 * MINUTE_MS
        ticket = writer.submit({(RULE, self.KEY): Sighting({t // MINUTE_MS}, t, t)})
        assert ticket.wait(5) and ticket.error is None
        return writer, store

    def _extend(self, writer: IngestWriter, minute: int) -> None:
        ext = Extension(minute * MINUTE_MS + 7_000, ((1, (item_of((RULE, self.KEY)),)),))
        ticket = writer.submit({}, extension=ext)
        assert ticket.wait(5) and ticket.error is None

    def test_logged_minutes_fold_once_the_interval_passed(self, tmp_path: Path) -> None:
        clock = FakeClock()
        writer, store = self._writer(tmp_path, clock)
        try:
            first = clock.now_ms() // MINUTE_MS - 30
            for m in range(first + 1, first + 4):
                self._extend(writer, m)
            assert len(store.pending) == 1
            time.sleep(1.5)  # the loop wakes every second: nothing is due yet
            assert len(store.pending) == 1
            clock.advance(601)
            wait_until(lambda: not store.pending.unfolded, timeout=5)
            state = store.get(RULE, self.KEY)
            assert state is not None and state.history.runs == ((first, first + 4),)
        finally:
            writer.shutdown()

    def test_ten_logged_minutes_per_key_start_a_fold_without_waiting(self, tmp_path: Path) -> None:
        """Replayed or backfilled minutes fold at the pace of their own minutes."""
        clock = FakeClock()
        writer, store = self._writer(tmp_path, clock)
        try:
            first = clock.now_ms() // MINUTE_MS - 30
            for m in range(first + 1, first + 11):
                self._extend(writer, m)
            wait_until(lambda: not store.pending.unfolded, timeout=5)
        finally:
            writer.shutdown()

    def test_an_exclusive_job_sees_every_logged_minute_in_the_records(self, tmp_path: Path) -> None:
        clock = FakeClock()
        writer, store = self._writer(tmp_path, clock)
        try:
            first = clock.now_ms() // MINUTE_MS - 30
            self._extend(writer, first + 1)
            logged = writer.run_exclusive(lambda: list(store.pending.fresh), timeout=5)
            assert logged == []
        finally:
            writer.shutdown()
