"""The receiver's fast path (store/durable.py) changes nothing but speed.

Two pipelines over two real RocksDB stores take the same requests: the decoder with the
DurableResources filled by the writer after each commit, and the decoder without it. Whatever
the requests (resources repeated or not, points in one minute or several, early points that
move first_seen, metrics a rule does not count, points out of range, ResourceMetrics without a
Resource or without points), the stored state must be the same, and the ingest counters too
for requests whose every ResourceMetrics has a Resource and points; and the fast path must
actually be taken for a repeated scrape.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from pathwatch.clock import MINUTE_MS
from pathwatch.receiver.decode import Decoder, DecodeResult, TimeBounds
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.store.db import Database, DatabaseOptions
from pathwatch.store.durable import DurableResources
from pathwatch.store.firstseen import FirstSeenStore, Retention

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=150)

MINUTE0 = 28_333_333  # a whole minute, Unix minutes
NOW = (MINUTE0 + 10) * MINUTE_MS
BOUNDS = TimeBounds(oldest_ms=(MINUTE0 - 30) * MINUTE_MS, newest_ms=NOW + 5 * MINUTE_MS)
RETENTION = {PARITY_RULE.id: Retention(horizon_minutes=PARITY_RULE.horizon_minutes)}
PATHS = ("/bin/a", "/bin/b", "/tmp/c")
COUNTERS = [
    f.name
    for f in dataclasses.fields(DecodeResult)
    if f.name not in ("batch", "marks", "extension")
]


def _attr(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


# One ResourceMetrics: (process index or None for no Resource, [(metric name, kind, [ms])]).
Metric = tuple[str, str, list[int]]
Resource = tuple[int | None, list[Metric]]

offsets = st.integers(-31 * 60_000, 7 * 60_000)  # around MINUTE0, some out of range
same_minute = st.integers(0, 59_999)
metric = st.tuples(
    st.sampled_from(["process.memory.usage", "process.cpu.time", "system.cpu.time"]),
    st.sampled_from(["gauge", "sum", "histogram"]),
    st.lists(st.one_of(same_minute, same_minute, offsets), max_size=3),
)
resource = st.tuples(st.one_of(st.none(), st.integers(0, 11)), st.lists(metric, max_size=3))
request = st.lists(resource, min_size=1, max_size=10)


def build(resources: list[Resource], shift_minutes: int) -> bytes:
    req = ExportMetricsServiceRequest()
    base = (MINUTE0 + shift_minutes) * MINUTE_MS
    for proc, metrics in resources:
        rm = req.resource_metrics.add()
        if proc is not None:
            rm.resource.attributes.extend(
                [
                    _attr("process.pid", 100 + proc),
                    _attr("process.executable.name", PATHS[proc % 3].rsplit("/", 1)[-1]),
                    _attr("process.owner", "root" if proc < 6 else "x" * 5000),  # not a key
                    _attr("process.executable.path", PATHS[proc % 3]),
                    _attr("host.name", "node-1"),
                    _attr("k8s.cluster.name", "prod"),
                    _attr("k8s.node.name", "node-1"),
                ]
            )
        sm = rm.scope_metrics.add()
        for name, kind, times in metrics:
            m = sm.metrics.add(name=name)
            points = getattr(m, kind).data_points
            for t in times:
                points.add(time_unix_nano=(base + t) * 1_000_000)
    return req.SerializeToString()


class Pipeline:
    def __init__(self, path: str, fast: bool, cache_keys: int = 100_000) -> None:
        self.db = Database(path, DatabaseOptions(fsync=False))
        self.store = FirstSeenStore(self.db, cache_keys=cache_keys)
        self.durable = DurableResources(1000) if fast else None
        self.decoder = Decoder([PARITY_RULE], durable=self.durable)

    def export(self, data: bytes) -> DecodeResult:
        result = self.decoder.decode(data, BOUNDS)
        extensions = [result.extension] if result.extension is not None else []
        applied = self.store.apply(result.batch, RETENTION, NOW, extensions=extensions)
        if self.durable is not None:
            marks = [*result.marks, *applied.extension_marks]
            self.durable.add(self.store.durable_entries(marks, applied.states))
            for value, fingerprints in applied.extended:
                self.durable.refresh(fingerprints, value)
        return result

    def stored(self) -> dict[object, object]:
        return dict(self.store.scan(PARITY_RULE.id))


@SETTINGS
@given(st.lists(st.tuples(request, st.integers(0, 2)), min_size=1, max_size=8))
@example([([(0, [("process.memory.usage", "gauge", [5_000])])], 0)] * 2)
@example(
    [
        ([(0, [("process.memory.usage", "gauge", [30_000])])], 0),
        ([(0, [("process.memory.usage", "gauge", [10_000])])], 0),  # moves first_seen earlier
    ]
)
@example(
    [
        ([(1, [("process.cpu.time", "sum", [1_000])])], 0),
        ([(1, [("process.cpu.time", "sum", [2_000])]), (None, [])], 0),  # an empty RM
    ]
)
def test_fast_path_stores_and_counts_exactly_what_the_full_path_does(
    exports: list[tuple[list[Resource], int]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fast = Pipeline(str(Path(tmp) / "fast"), fast=True)
        full = Pipeline(str(Path(tmp) / "full"), fast=False)
        try:
            for resources, shift in exports:
                data = build(resources, shift)
                a, b = fast.export(data), full.export(data)
                if all(proc is not None and any(t for _, _, t in ms) for proc, ms in resources):
                    # The counters agree for every ResourceMetrics with a Resource and points;
                    # the fast path does not see the others (store/durable.py).
                    assert [getattr(a, c) for c in COUNTERS] == [getattr(b, c) for c in COUNTERS]
                assert a.points_accepted == b.points_accepted
            # Logged minutes (store/extend.py) read as if written; folded, they are written.
            assert fast.stored() == full.stored()
            fast.store.fold_all(RETENTION, NOW)
            assert not fast.store.pending
            assert fast.stored() == full.stored()
        finally:
            fast.db.close()
            full.db.close()


def test_a_repeated_scrape_takes_the_fast_path_and_a_new_minute_does_not(tmp_path: Path) -> None:
    pipe = Pipeline(str(tmp_path / "db"), fast=True)
    try:
        scrape = [(p, [("process.memory.usage", "gauge", [1_000]), ("process.cpu.time", "sum",
                   [1_000, 1_000])]) for p in range(4)]  # fmt: skip
        first = pipe.export(build(scrape, 0))
        assert first.batch and len(first.marks) == 4
        again = pipe.export(build(scrape, 0))
        assert not again.batch and not again.marks  # answered by the fast path
        assert (again.resources_tracked, again.points_accepted) == (4, 12)
        later = pipe.export(build(scrape, 1))  # the next minute: written, keys kept
        assert len(later.batch) == 4
        third = pipe.export(build(scrape, 2))  # a running process: logged, not decoded
        assert not third.batch and third.extension is not None
        assert len(third.extension.resources) == 4
        state = pipe.store.get(PARITY_RULE.id, ("node-1", "prod", "node-1", "100", "/bin/a", "a"))
        assert state is not None and state.history.runs == ((MINUTE0, MINUTE0 + 3),)
    finally:
        pipe.db.close()


def test_the_fast_path_does_not_depend_on_the_key_cache(tmp_path: Path) -> None:
    """A commit of more keys than `store.cache_keys` still makes all of them durable: the
    entries come from the commit's own states, not from the key cache it overflows."""
    pipe = Pipeline(str(tmp_path / "db"), fast=True, cache_keys=2)
    try:
        scrape = [(p, [("process.memory.usage", "gauge", [1_000])]) for p in range(12)]
        assert len(pipe.export(build(scrape, 0)).marks) == 12
        assert pipe.durable is not None and len(pipe.durable) == 12
        again = pipe.export(build(scrape, 0))
        assert not again.batch and again.resources_tracked == 12
    finally:
        pipe.db.close()


def test_a_scrape_with_one_new_process_decodes_only_that_one(tmp_path: Path) -> None:
    pipe = Pipeline(str(tmp_path / "db"), fast=True)
    try:

        def scrape(procs: range) -> list[Resource]:
            return [(p, [("process.memory.usage", "gauge", [2_000])]) for p in procs]

        pipe.export(build(scrape(range(8)), 0))
        result = pipe.export(build(scrape(range(9)), 0))  # process 8 is new
        assert [key[3] for _, key in result.batch] == ["108"]
        assert len(result.marks) == 1
        assert (result.resources_tracked, result.points_accepted) == (9, 9)
        assert not pipe.export(build(scrape(range(9)), 0)).batch
    finally:
        pipe.db.close()


def test_refresh_sets_the_value_keeps_the_keys_and_stays_bounded() -> None:
    """`refresh` is `add` of (fingerprint, value, ()) for each: the kept keys stay, refreshed
    entries move to the young end, and past capacity the oldest half goes."""
    durable = DurableResources(4)
    durable.add([(1, 10, (b"k1",)), (2, 10, (b"k2",)), (3, 10, ())])
    durable.refresh([1, 3], 20)
    assert (durable.get(1), durable.keys_of(1)) == (20, (b"k1",))
    assert (durable.get(3), durable.keys_of(3)) == (20, None)
    assert (durable.get(2), durable.keys_of(2)) == (10, (b"k2",))
    durable.refresh([4, 5], 30)  # five entries: 2 (the oldest) and 1 and 3 go
    assert len(durable) <= 4
    assert durable.get(2) is None and durable.keys_of(2) is None
    assert durable.get(5) == 30
    DurableResources(0).refresh([1], 5)  # keeps nothing, as add
