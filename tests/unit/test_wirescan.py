"""The optional C accelerator of the receiver's fast path (receiver/_wirescan.c).

Wherever `scan` answers, it must answer exactly what the reduced views answer (FlatRequest and
MergedRequest, otlpview.proto): checked on requests built field by field with every oddity the
wire format allows (unknown fields, repeated singular fields, packed timestamps, groups,
histograms, ResourceMetrics without a Resource or with two), on truncated and corrupted bytes,
and through the Decoder, whose results must not depend on the path. It must also answer for
what collectors send, or it would be no faster.

The suite runs twice in `make test`: with the accelerator, where TEST_REQUIRE_ACCELERATOR
makes its absence a failure, and with PATHWATCH_PURE_PYTHON=1.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import pytest
from bench.wire import varint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pathwatch.receiver import decode
from pathwatch.receiver._view import FlatRequest, RawRequest
from pathwatch.receiver.decode import PURE_PYTHON_ENV, Decoder, _points_per_resource
from pathwatch.rules.builtin import PARITY_RULE
from tests.support import Proc, fixture_request, process_request
from tests.unit.test_durable_fastpath import BOUNDS, COUNTERS, NOW, RETENTION, Pipeline, build
from tests.unit.test_durable_fastpath import request as fastpath_request

if os.environ.get("TEST_REQUIRE_ACCELERATOR", "") not in ("", "0"):
    from pathwatch.receiver import _wirescan as wirescan  # a build without it fails here
else:
    wirescan = pytest.importorskip(
        "pathwatch.receiver._wirescan",
        reason="the C accelerator is not built (no compiler at install time)",
    )
SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_the_accelerator_is_in_use_unless_switched_off() -> None:
    """`make test` sets TEST_REQUIRE_ACCELERATOR on its accelerated pass: a build that
    silently lost the extension fails here instead of testing the pure path twice."""
    pure = os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")
    assert decode.ACCELERATED is not pure


# -- a protobuf encoder that can also write what no collector does ------------------------


def field(number: int, wire: int, payload: bytes = b"") -> bytes:
    tag = varint(number << 3 | wire)
    if wire == 2:
        return tag + varint(len(payload)) + payload
    return tag + payload


def fixed(number: int, value: int) -> bytes:
    return field(number, 1, struct.pack("<Q", value))


MINUTE_NS = 60_000_000_000
BASE_NS = 29_000_000 * MINUTE_NS

# A field the walker does not read: every valid wire type, and the ones it must refuse.
unknown = st.one_of(
    st.builds(lambda n, v: field(n, 0, varint(v)), st.integers(13, 40), st.integers(0, 2**64 - 1)),
    st.builds(lambda n, b: field(n, 2, b), st.integers(13, 40), st.binary(max_size=6)),
    st.builds(lambda n: field(n, 5, b"\x01\x02\x03\x04"), st.integers(13, 40)),
    st.builds(lambda n: field(n, 1, b"\x00" * 8), st.integers(13, 40)),
    st.builds(lambda n: field(n, 3) + field(n, 4), st.integers(13, 40)),  # an empty group
)
timestamps = st.one_of(
    st.integers(0, 59).map(lambda s: BASE_NS + s * 1_000_000_000),
    st.integers(0, 2**64 - 1),
    st.just(0),
)
point_field = st.one_of(
    timestamps.map(lambda t: fixed(3, t)),
    timestamps.map(lambda t: fixed(2, t)),  # start_time_unix_nano
    st.integers(0, 2**64 - 1).map(lambda v: fixed(4, v)),  # as_double
    st.integers(0, 2**64 - 1).map(lambda v: fixed(6, v)),  # as_int
    timestamps.map(lambda t: field(3, 2, struct.pack("<Q", t))),  # packed: valid for a view
    st.integers(0, 99).map(lambda v: field(3, 0, varint(v))),  # wrong wire type
    st.binary(max_size=8).map(lambda b: field(7, 2, b)),  # attributes
    st.integers(0, 3).map(lambda v: field(8, 0, varint(v))),  # flags
    unknown,
)
point = st.lists(point_field, max_size=5).map(b"".join)
number_points = st.lists(
    st.one_of(point.map(lambda p: field(1, 2, p)), st.just(field(2, 0, b"\x02")), unknown),
    max_size=4,
).map(b"".join)
names = st.sampled_from([b"process.cpu.time", b"process.memory.usage", b"system.cpu", b"\xff"])
metric_field = st.one_of(
    names.map(lambda n: field(1, 2, n)),
    st.just(field(2, 2, b"a description")),
    st.just(field(3, 2, b"By")),
    number_points.map(lambda p: field(5, 2, p)),  # gauge
    number_points.map(lambda p: field(7, 2, p)),  # sum
    st.sampled_from([9, 10, 11]).flatmap(
        lambda n: number_points.map(lambda p: field(n, 2, p))
    ),  # histogram, exponential histogram, summary
    st.just(field(1, 0, b"\x01")),  # a name of the wrong wire type
    unknown,
)
metric = st.lists(metric_field, max_size=5).map(b"".join)
scope_field = st.one_of(
    metric.map(lambda m: field(2, 2, m)),
    metric.map(lambda m: field(2, 2, m)),
    st.just(field(1, 2, field(1, 2, b"otelcol/hostmetricsreceiver/process"))),  # scope
    st.just(field(3, 2, b"https://opentelemetry.io/schemas/1.9.0")),
    unknown,
)
scope = st.lists(scope_field, max_size=4).map(b"".join)
resources = st.sampled_from(
    [
        field(1, 2, field(1, 2, b"process.pid") + field(2, 2, field(3, 0, varint(7)))),
        field(1, 2, field(1, 2, b"host.name") + field(2, 2, field(1, 2, b"node-1"))),
        b"",
        b"\x80",  # not a valid Resource: still bytes to the view
    ]
)
rm_field = st.one_of(
    resources.map(lambda r: field(1, 2, r)),
    scope.map(lambda s: field(2, 2, s)),
    scope.map(lambda s: field(2, 2, s)),
    st.just(field(3, 2, b"https://opentelemetry.io/schemas/1.9.0")),
    unknown,
)
resource_metrics = st.lists(rm_field, max_size=5).map(b"".join)
request_bytes = st.lists(
    st.one_of(resource_metrics.map(lambda r: field(1, 2, r)), unknown), max_size=6
).map(b"".join)

# Requests as collectors send them: one Resource first, then scopes, the usual fields.
plain_point = st.tuples(
    st.integers(0, 59).map(lambda s: BASE_NS + s * 1_000_000_000),
    st.sampled_from([4, 6]),
).map(lambda tv: fixed(2, BASE_NS) + fixed(3, tv[0]) + fixed(tv[1], 12345))
plain_metric = st.tuples(names, st.sampled_from([5, 7]), st.lists(plain_point, max_size=3)).map(
    lambda m: (
        field(1, 2, m[0])
        + field(3, 2, b"s")
        + field(m[1], 2, b"".join(field(1, 2, p) for p in m[2]))
    )
)
plain_rm = st.tuples(resources, st.lists(plain_metric, max_size=4)).map(
    lambda r: (
        field(1, 2, r[0])
        + field(2, 2, field(1, 2, field(1, 2, b"scope")) + b"".join(field(2, 2, m) for m in r[1]))
    )
)
plain_request = st.lists(plain_rm.map(lambda r: field(1, 2, r)), min_size=1, max_size=6).map(
    b"".join
)


def views(data: bytes) -> tuple[object, ...] | None:
    """What Decoder._decode_known reads through the views, in scan's shape (None: the flat
    view does not parse)."""
    try:
        flat = FlatRequest.FromString(data).resource_metrics
    except Exception:
        return None
    metrics = flat.scope_metrics.metrics
    g, s = metrics.gauge.data_points, metrics.sum.data_points
    stamps = [*g.time_unix_nano, *s.time_unix_nano]
    raws = list(flat.resource)
    return (
        raws,
        set(metrics.name),
        len(stamps),
        len(g.as_double) + len(g.as_int) + len(s.as_double) + len(s.as_int),
        min(stamps, default=0),
        max(stamps, default=0),
        _points_per_resource(data, raws),
    )


def check(data: bytes) -> tuple[object, ...] | None:
    scanned = wirescan.scan(data)
    if scanned is not None:
        *read, spans = scanned
        assert tuple(read) == views(data)
        # Each span cuts out exactly the ResourceMetrics the raw view lists.
        cut = [data[a:b] for a, b in struct.iter_unpack("=II", spans)]
        assert cut == list(RawRequest.FromString(data).resource_metrics)
    return scanned


@SETTINGS
@given(request_bytes)
def test_whatever_scan_answers_the_views_answer(data: bytes) -> None:
    check(data)


@SETTINGS
@given(plain_request)
def test_scan_answers_for_plain_requests(data: bytes) -> None:
    assert check(data) is not None


@SETTINGS
@given(plain_request, st.data())
def test_truncated_or_corrupted_bytes_never_crash_or_disagree(
    data: bytes, draw: st.DataObject
) -> None:
    cut = draw.draw(st.integers(0, len(data)))
    check(data[:cut])
    flips = draw.draw(
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=4)
    )
    corrupted = bytearray(data)
    for at, byte in flips:
        corrupted[at] = byte
    check(bytes(corrupted))


@SETTINGS
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_or_disagree(data: bytes) -> None:
    check(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (field(1, 2, field(2, 2, b"")), "a ResourceMetrics without a Resource"),
        (field(1, 2, field(1, 2, b"") + field(1, 2, b"x")), "a ResourceMetrics with two"),
        (field(1, 2, field(1, 2, b"") + field(2, 2, field(2, 2, field(9, 2, b"")))), "a histogram"),
        (
            field(
                1,
                2,
                field(1, 2, b"")
                + field(2, 2, field(2, 2, field(5, 2, field(1, 2, field(3, 2, b"\x00" * 8))))),
            ),
            "packed timestamps",
        ),
        (field(1, 0, b"\x01"), "a ResourceMetrics of the wrong wire type"),
        (field(5, 3) + field(5, 4), "a group"),
        (b"\x0a\x05\x0a", "a truncated length"),
        (b"\x00", "field number 0"),
        (b"\x8a" + b"\x80" * 9 + b"\x02", "an overlong tag"),
    ],
)
def test_scan_leaves_what_collectors_do_not_send_to_the_views(data: bytes, why: str) -> None:
    assert wirescan.scan(data) is None, why


def test_scan_reads_the_collectors_process_scrapes() -> None:
    """The hostmetrics golden output (real collector data) and the test suite's
    collector-shaped requests take the one pass."""
    for request in (
        fixture_request(NOW),
        process_request([Proc(i, f"/bin/p{i}") for i in range(50)], NOW),
    ):
        data = request.SerializeToString()
        scanned = check(data)
        assert scanned is not None
        assert len(scanned[0]) == len(request.resource_metrics)


def test_scan_accepts_any_buffer_and_refuses_other_types() -> None:
    data = process_request([Proc(1, "/bin/a")], NOW).SerializeToString()
    assert wirescan.scan(memoryview(data)) == wirescan.scan(bytearray(data)) == wirescan.scan(data)
    with pytest.raises(TypeError):
        wirescan.scan("not bytes")


@settings(derandomize=True, database=None, deadline=None, max_examples=150)
@given(st.lists(st.tuples(fastpath_request, st.integers(0, 2)), min_size=1, max_size=8))
def test_the_decoder_decides_the_same_on_both_paths(
    exports: list[tuple[list[object], int]],
) -> None:
    """Two fast-path pipelines over real RocksDB stores, one reading requests through the C
    scan, the other through the views: the same results, counters and stored state."""
    with tempfile.TemporaryDirectory() as tmp:
        accelerated = Pipeline(str(Path(tmp) / "c"), fast=True)
        pure = Pipeline(str(Path(tmp) / "py"), fast=True)
        pure.decoder = Decoder([PARITY_RULE], durable=pure.durable, accelerate=False)
        try:
            for resources, shift in exports:
                data = build(resources, shift)  # type: ignore[arg-type]
                a, b = accelerated.export(data), pure.export(data)
                assert [getattr(a, c) for c in COUNTERS] == [getattr(b, c) for c in COUNTERS]
                assert (a.batch, a.marks, a.extension) == (b.batch, b.marks, b.extension)
            assert accelerated.stored() == pure.stored()
        finally:
            accelerated.db.close()
            pure.db.close()


def test_a_pure_decoder_never_calls_the_accelerator() -> None:
    assert Decoder([PARITY_RULE], accelerate=False)._scan is None
    assert (Decoder([PARITY_RULE])._scan is None) is not decode.ACCELERATED
    assert BOUNDS.oldest_ms < NOW < BOUNDS.newest_ms and RETENTION


# -- classify: the per-resource loop -----------------------------------------------------------

MINUTE = 29_000_000
resource_state = st.tuples(
    st.one_of(
        st.none(),  # not durable
        st.tuples(
            st.sampled_from([MINUTE - 2, MINUTE - 1, MINUTE, MINUTE + 1]),  # the entry's minute
            st.integers(0, 59_999),  # its floor within the minute
            st.booleans(),  # tracked
        ),
    ),
    st.booleans(),  # keys kept
    st.booleans(),  # points
)


@SETTINGS
@given(
    st.lists(resource_state, max_size=24),
    st.integers(0, 59_999),
    st.booleans(),
)
def test_classify_decides_what_the_python_loop_decides(
    states: list[tuple[tuple[int, int, bool] | None, bool, bool]],
    earliest_offset: int,
    one_timestamp: bool,
) -> None:
    from pathwatch.store.durable import DurableResources, encode

    raws = [b"resource %d" % i for i in range(len(states))]
    durable = DurableResources(1000)
    durable.add(
        (hash(raw), encode(minute * MINUTE_MS_ + floor, tracked), (b"\x00k%d" % i,) if kept else ())
        for i, (raw, (entry, kept, _)) in enumerate(zip(raws, states, strict=True))
        if entry is not None
        for minute, floor, tracked in [entry]
    )
    with_points = bytes(int(points) for _, _, points in states)
    earliest = MINUTE * MINUTE_MS_ + earliest_offset
    previous = MINUTE - 1 if one_timestamp else -1
    decoder = Decoder([PARITY_RULE], durable=durable, accelerate=False)
    expected = decoder._classify_py(b"", raws, MINUTE, earliest, previous, with_points)
    got = wirescan.classify(
        raws, durable.entries, durable.kept_keys, MINUTE, earliest, previous, with_points
    )
    assert got == expected


def test_classify_leaves_values_it_cannot_hold_to_python() -> None:
    raws = [b"r"]
    assert wirescan.classify(raws, {hash(b"r"): -3}, {}, 1, 1, 0, b"\x01") is NotImplemented
    assert wirescan.classify(raws, {hash(b"r"): 2**70}, {}, 1, 1, 0, b"\x01") is NotImplemented
    with pytest.raises(ValueError, match="one flag per resource"):
        wirescan.classify(raws, {}, {}, 1, 1, 0, b"")
    with pytest.raises(TypeError):
        wirescan.classify(raws, {}, {})  # type: ignore[call-arg]


MINUTE_MS_ = 60_000
