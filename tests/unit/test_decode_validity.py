"""No input makes a process invisible: bytes that are not UTF-8 are tracked escaped, and every
resource or point the decoder refuses is counted by reason, named in partial_success and logged."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.metrics.v1.metrics_pb2 import ResourceMetrics
from structlog.testing import capture_logs

from pathwatch.observations import KeyTuple
from pathwatch.receiver._accounting import RejectionLog, count_decoded
from pathwatch.receiver.decode import (
    Decoder,
    DecodeResult,
    TimeBounds,
    rejection_message,
)
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.store.durable import DurableResources, encode
from pathwatch.store.extend import item_of
from pathwatch.telemetry.metrics import Metrics
from tests.support import Proc, process_request

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=200)

NOW = 1_800_000_000_000 + 7_000  # 7 s into a minute
BOUNDS = TimeBounds(NOW - 40 * 86_400_000, NOW + 300_000)
POINTS_PER_PROC = 4  # tests.support.process_request: 3 cpu time points, 1 memory point


# -- building requests with arbitrary bytes ---------------------------------------------------
#
# The generated OTLP classes refuse str values that are not UTF-8, so Resources are written
# on the wire by hand and spliced in front of a ResourceMetrics built normally (a message's
# fields may come in any order).


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(number: int, body: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(body)) + body


Value = bytes | str | int | AnyValue


def _kv(key: bytes | str, value: Value) -> bytes:
    k = key.encode() if isinstance(key, str) else key
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        any_value = _ld(1, value)  # AnyValue.string_value with whatever bytes
    elif isinstance(value, int):
        any_value = AnyValue(int_value=value).SerializeToString()
    else:
        any_value = value.SerializeToString()
    return _ld(1, _ld(1, k) + _ld(2, any_value))  # Resource.attributes (KeyValue)


def attributes(proc: Proc, **overrides: Value | None) -> list[tuple[bytes | str, Value]]:
    """A process's resource attributes (as tests.support writes them), with overrides by
    attribute name (dots as underscores); None removes the attribute."""
    base: dict[str, Value] = {
        "process.pid": proc.pid,
        "process.executable.name": proc.exe_name,
        "process.executable.path": proc.path,
        "process.command_line": proc.path + " --serve",
        "host.name": proc.host,
        "k8s.cluster.name": proc.cluster,
        "k8s.node.name": proc.host,
    }
    for name, value in overrides.items():
        key = {"command_line": "process.command_line"}.get(name, name.replace("_", "."))
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return list(base.items())


def request(
    resources: Iterable[list[tuple[bytes | str, Value]]],
    time_ms: int = NOW,
    resource_metrics: ResourceMetrics | None = None,
) -> bytes:
    """An export request with one ResourceMetrics per attribute list, each with the metrics of
    `resource_metrics` (default: tests.support's cpu and memory points at `time_ms`)."""
    if resource_metrics is None:
        resource_metrics = process_request([Proc(0, "/x")], time_ms).resource_metrics[0]
    rm = ResourceMetrics()
    rm.CopyFrom(resource_metrics)
    rm.ClearField("resource")
    body = rm.SerializeToString()
    out = b""
    for attrs in resources:
        resource = b"".join(_kv(k, v) for k, v in attrs)
        out += _ld(1, _ld(1, resource) + body)
    return out


def decode(
    data: bytes, decoder: Decoder | None = None, host_filter: Callable[[str], bool] | None = None
) -> DecodeResult:
    decoder = decoder or Decoder([PARITY_RULE])
    result = decoder.decode(data, BOUNDS, host_filter)
    assert decoder.decode(data, BOUNDS, host_filter) == result  # caches change no answer
    return result


def keys(result: DecodeResult) -> set[KeyTuple]:
    return {key for _, key in result.batch}


def key_of(proc: Proc, path: str | None = None) -> KeyTuple:
    path = proc.path if path is None else path
    return (proc.host, proc.cluster, proc.host, str(proc.pid), path, proc.exe_name)


GOOD = Proc(1, "/usr/bin/containerd")
IMPLANT = Proc(31337, "/tmp/x/implant")


# -- bytes that are not UTF-8 -----------------------------------------------------------------


def test_executable_path_that_is_not_utf8_is_tracked_escaped() -> None:
    """A path holding bytes that are not UTF-8 makes a key, with those bytes written \\xNN;
    nothing is rejected and the process beside it is tracked as before."""
    bad = attributes(IMPLANT, process_executable_path=b"/tmp/\xff\xfe/implant")
    result = decode(request([bad, attributes(GOOD)]))
    assert keys(result) == {key_of(IMPLANT, "/tmp/\\xff\\xfe/implant"), key_of(GOOD)}
    assert result.resources_tracked == 2 and result.resources_untracked == 0
    assert result.points_rejected == 0
    assert result.points_accepted == 2 * POINTS_PER_PROC


def test_valid_utf8_beyond_ascii_is_kept_as_is() -> None:
    """Valid multi-byte UTF-8 in a key field is decoded, not escaped."""
    path = "/opt/caf\u00e9/\U0001f600"
    result = decode(request([attributes(IMPLANT, process_executable_path=path.encode())]))
    assert keys(result) == {key_of(IMPLANT, path)}


def test_surrogates_encoded_as_utf8_are_escaped() -> None:
    """Bytes encoding a UTF-16 surrogate (CESU-8, not valid UTF-8) are escaped like any
    invalid bytes, so the key is a well-formed string."""
    result = decode(request([attributes(IMPLANT, process_executable_path=b"/tmp/\xed\xa0\x80")]))
    assert keys(result) == {key_of(IMPLANT, "/tmp/\\xed\\xa0\\x80")}


def test_non_key_attribute_that_is_not_utf8_does_not_hide_the_process() -> None:
    """A command line that is not UTF-8 (not a key field) leaves the key untouched."""
    bad = attributes(IMPLANT, command_line=b"/tmp/x/implant \xff\xff --serve")
    result = decode(request([bad]))
    assert keys(result) == {key_of(IMPLANT)}
    assert result.points_rejected == 0


def test_attribute_name_that_is_not_utf8_does_not_hide_the_process() -> None:
    """An attribute whose name is not UTF-8 is ignored; the key fields are still read."""
    bad = [*attributes(IMPLANT), (b"evil.\xff", "x"), (b"\xc3", b"\xff")]
    result = decode(request([bad]))
    assert keys(result) == {key_of(IMPLANT)}


def test_attribute_given_twice_keeps_the_last_value_on_both_views() -> None:
    """A repeated attribute name counts with its last value, whether or not another name
    forces the list-shaped fallback."""
    twice = [*attributes(IMPLANT), ("process.executable.path", "/tmp/second")]
    assert keys(decode(request([twice]))) == {key_of(IMPLANT, "/tmp/second")}
    assert keys(decode(request([[(b"\xff", "x"), *twice]]))) == {key_of(IMPLANT, "/tmp/second")}


def test_metric_name_that_is_not_utf8_does_not_fail_the_request() -> None:
    """A metric name that is not UTF-8 is matched escaped; the request is not refused."""
    rm = process_request([Proc(0, "/x")], NOW).resource_metrics[0]
    rm.scope_metrics[0].metrics[1].name = "process.memory.usaXX"
    data = request([attributes(IMPLANT)], resource_metrics=rm)
    data = data.replace(b"usaXX", b"usa\xff\xfe")
    result = decode(data)
    assert keys(result) == {key_of(IMPLANT)}
    assert result.points_accepted == POINTS_PER_PROC


def test_escaped_key_is_the_same_on_every_path_to_it() -> None:
    """The fast path (durable resources) and the full path agree on escaped keys."""
    data = request([attributes(IMPLANT, process_executable_path=b"/tmp/\x80")])
    full = decode(data)
    fast = Decoder([PARITY_RULE], durable=DurableResources(100))
    assert keys(fast.decode(data, BOUNDS)) == keys(full) == {key_of(IMPLANT, "/tmp/\\x80")}


# -- untracked resources, by reason -------------------------------------------------------------


def test_missing_key_field_rejects_the_points_and_names_the_field() -> None:
    """A resource without process.pid is untracked (missing_field); its points are rejected
    and the message names the field."""
    result = decode(request([attributes(IMPLANT, process_pid=None), attributes(GOOD)] * 1))
    assert keys(result) == {key_of(GOOD)}
    u = result.untracked["missing_field"]
    assert (u.resources, u.points, u.fields) == (1, POINTS_PER_PROC, ["process.pid"])
    assert result.resources_untracked == 1
    assert result.points_rejected == POINTS_PER_PROC
    assert result.points_accepted == POINTS_PER_PROC
    message = rejection_message(result, BOUNDS)
    assert message == (
        f"pathwatch rejected {POINTS_PER_PROC} data points: {POINTS_PER_PROC} data points from "
        "1 resource without key field process.pid"
    )


def test_several_missing_fields_are_all_named() -> None:
    """Resources missing different fields: each field is named once, the counts add up."""
    data = request(
        [
            attributes(Proc(2, "/a"), process_pid=None),
            attributes(Proc(3, "/b"), process_pid=None),
            attributes(Proc(4, "/c"), host_name=None),
        ]
    )
    result = decode(data)
    u = result.untracked["missing_field"]
    assert (u.resources, u.points) == (3, 3 * POINTS_PER_PROC)
    assert sorted(u.fields) == ["host.name", "process.pid"]
    message = rejection_message(result, BOUNDS)
    assert f"{3 * POINTS_PER_PROC} data points from 3 resources without key field" in message


def test_empty_key_field_counts_as_missing() -> None:
    """An empty executable path (a kernel thread) is a missing field."""
    result = decode(request([attributes(IMPLANT, process_executable_path="")]))
    assert result.untracked["missing_field"].fields == ["process.executable.path"]


@pytest.mark.parametrize(
    "value",
    [
        AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="/tmp/x")])),
        AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="a", value=AnyValue())])),
        AnyValue(bytes_value=b"/tmp/x"),
    ],
    ids=["array", "kvlist", "bytes"],
)
def test_key_field_of_unsupported_type_is_named(value: AnyValue) -> None:
    """A key field that is an array, key-value list or bytes is untracked as
    unsupported_type, named in the message."""
    result = decode(request([attributes(IMPLANT, process_executable_path=value)]))
    assert result.batch == {}
    u = result.untracked["unsupported_type"]
    assert (u.resources, u.points, u.fields) == (1, POINTS_PER_PROC, ["process.executable.path"])
    assert "key field process.executable.path is not a string" in rejection_message(result, BOUNDS)


def test_key_field_without_a_value_counts_as_missing() -> None:
    """An attribute with an empty AnyValue is a missing field, not an unsupported type."""
    result = decode(request([attributes(IMPLANT, process_executable_path=AnyValue())]))
    assert set(result.untracked) == {"missing_field"}


def test_oversized_key_field_is_too_long_and_named() -> None:
    """A key field over max_key_field_bytes (counted after escaping) is too_long; the old
    key_too_long point count still says how many points it cost."""
    decoder = Decoder([PARITY_RULE], max_key_field_bytes=16)
    result = decode(request([attributes(IMPLANT, process_executable_path=b"/tmp/\xff\xff\xff")]))
    assert result.batch  # 8 bytes on the wire, 17 characters escaped: over a cap of 16 below
    result = decode(
        request([attributes(IMPLANT, process_executable_path=b"/tmp/\xff\xff\xff")]), decoder
    )
    u = result.untracked["too_long"]
    assert (u.resources, u.points, u.fields) == (1, POINTS_PER_PROC, ["process.executable.path"])
    assert result.points_key_too_long == POINTS_PER_PROC
    assert "oversized key attribute (process.executable.path)" in rejection_message(result, BOUNDS)


def test_non_key_attribute_over_the_cap_is_ignored() -> None:
    """A huge attribute that no rule keys on does not refuse the resource."""
    decoder = Decoder([PARITY_RULE], max_key_field_bytes=16)
    result = decode(request([attributes(Proc(1, "/a"), command_line=b"\xff" * 1000)]), decoder)
    assert result.resources_tracked == 1 and not result.untracked


def test_resource_that_does_not_decode_is_invalid() -> None:
    """Resource bytes that are not a Resource are untracked as invalid; the request is
    still answered and its other resources are tracked."""
    rm = process_request([Proc(0, "/x")], NOW).resource_metrics[0]
    rm.ClearField("resource")
    garbage = _ld(1, _ld(1, b"\x0a\xff\xff\xff\x0f") + rm.SerializeToString())
    result = decode(garbage + request([attributes(GOOD)]))
    assert keys(result) == {key_of(GOOD)}
    u = result.untracked["invalid"]
    assert (u.resources, u.points) == (1, POINTS_PER_PROC)
    assert "from 1 resource whose Resource does not decode" in rejection_message(result, BOUNDS)


def test_a_key_for_one_rule_is_enough_to_be_tracked() -> None:
    """A resource that one rule keys and another cannot is tracked, nothing rejected."""
    per_host = dataclasses.replace(
        PARITY_RULE, id="per_host", key_fields=("host.name", "process.executable.path")
    )
    result = decode(
        request([attributes(IMPLANT, process_pid=None)]), Decoder([PARITY_RULE, per_host])
    )
    assert {rule for rule, _ in result.batch} == {"per_host"}
    assert result.resources_tracked == 1 and result.points_rejected == 0


def test_resource_whose_points_are_all_too_old_is_tracked_not_untracked() -> None:
    """Points outside the time bounds are rejected for their time; the resource still has a
    key, so it is not counted among untracked resources for a reason it does not have."""
    result = decode(request([attributes(IMPLANT)], time_ms=BOUNDS.oldest_ms - 1))
    assert result.points_too_old == POINTS_PER_PROC
    assert result.resources_untracked == 0 and result.resources_tracked == 1


# -- timestamp 0 -----------------------------------------------------------------------------


def _fixed64(number: int, value: int) -> bytes:
    return _varint(number << 3 | 1) + struct.pack("<Q", value)


def test_points_without_timestamp_are_rejected_and_named() -> None:
    """Points whose time_unix_nano is 0 (absent on the wire) are rejected as zero_timestamp;
    the process's other points are accepted and make its key."""
    rm = process_request([Proc(0, "/x")], NOW).resource_metrics[0]
    rm.scope_metrics[0].metrics[0].sum.data_points[0].time_unix_nano = 0
    rm.scope_metrics[0].metrics[1].sum.data_points[0].time_unix_nano = 0
    result = decode(request([attributes(IMPLANT)], resource_metrics=rm))
    assert keys(result) == {key_of(IMPLANT)}
    assert result.points_zero_timestamp == 2
    assert result.points_accepted == POINTS_PER_PROC - 2
    assert result.points_rejected == 2
    assert rejection_message(result, BOUNDS) == (
        "pathwatch rejected 2 data points: 2 without a timestamp (time_unix_nano 0)"
    )


def test_only_points_without_timestamp_make_no_key() -> None:
    """A process whose every point lacks a timestamp is not stored; all its points are
    rejected as zero_timestamp, none silently dropped."""
    rm = process_request([Proc(0, "/x")], NOW).resource_metrics[0]
    for m in rm.scope_metrics[0].metrics:
        for dp in m.sum.data_points:
            dp.time_unix_nano = 0
    result = decode(request([attributes(IMPLANT)], resource_metrics=rm))
    assert result.batch == {}
    assert result.points_zero_timestamp == POINTS_PER_PROC and result.points_accepted == 0


def test_timestamp_zero_written_out_on_the_wire_is_zero_timestamp() -> None:
    """A time_unix_nano field explicitly written as 0 is the same as an absent one."""
    point = _fixed64(3, 0) + _fixed64(4, 0)  # time_unix_nano = 0, as_double = 0.0
    metric = _ld(1, b"process.memory.usage") + _ld(5, _ld(1, point))  # a gauge
    rm = _ld(1, b"".join(_kv(k, v) for k, v in attributes(IMPLANT))) + _ld(2, _ld(2, metric))
    result = decode(_ld(1, rm))
    assert result.points_zero_timestamp == 1 and result.points_too_old == 0


def test_histogram_point_without_timestamp_is_counted_by_its_start_time() -> None:
    """A histogram point with a start time but no time is rejected as zero_timestamp."""
    rm = process_request([Proc(0, "/x")], NOW).resource_metrics[0]
    h = rm.scope_metrics[0].metrics.add(name="process.latency").histogram
    h.data_points.add(start_time_unix_nano=1, count=3)
    result = decode(request([attributes(IMPLANT)], resource_metrics=rm))
    assert result.points_zero_timestamp == 1
    assert result.points_accepted == POINTS_PER_PROC


def test_mixed_resource_counts_points_without_timestamp() -> None:
    """A resource mixing counted and uncounted metrics (the per-metric view) counts the
    counted metrics' points without timestamp, and only those."""
    rm = process_request([Proc(0, "/x")], NOW).resource_metrics[0]
    rm.scope_metrics[0].metrics[1].sum.data_points[0].time_unix_nano = 0
    other = rm.scope_metrics[0].metrics.add(name="system.cpu.time")
    other.sum.data_points.add(as_double=1.0)  # no timestamp, not counted by the rule
    result = decode(request([attributes(IMPLANT)], resource_metrics=rm))
    assert result.points_zero_timestamp == 1
    assert result.points_accepted == POINTS_PER_PROC - 1


# -- the fast path ----------------------------------------------------------------------------


def _durable_decoder(data: bytes) -> Decoder:
    """A decoder with durable resources filled as the writer would after storing `data`."""
    durable = DurableResources(100)
    decoder = Decoder([PARITY_RULE], durable=durable)
    first = decoder.decode(data, BOUNDS)
    durable.add(
        (m.fingerprint, encode(m.minute * 60_000, bool(m.keys)), tuple(map(item_of, m.keys)))
        for m in first.marks
    )
    return decoder


def test_fast_path_does_not_accept_points_without_timestamp() -> None:
    """A repeated scrape whose resources are all durable still reports points without a
    timestamp instead of counting them accepted."""
    procs = [attributes(Proc(i, f"/bin/p{i}")) for i in range(8)]
    decoder = _durable_decoder(request(procs))
    again = decoder.decode(request(procs), BOUNDS)
    assert not again.batch and again.points_accepted == 8 * POINTS_PER_PROC  # fast path
    rm = process_request([Proc(0, "/x")], NOW).resource_metrics[0]
    rm.scope_metrics[0].metrics[1].sum.data_points[0].time_unix_nano = 0
    result = decoder.decode(request(procs, resource_metrics=rm), BOUNDS)
    assert result.points_zero_timestamp == 8
    assert result.points_accepted == 8 * (POINTS_PER_PROC - 1)


def test_fast_path_reports_untracked_resources() -> None:
    """A repeated scrape holding a resource without key is answered with that resource's
    points rejected, every time, as on the full path."""
    procs = [attributes(Proc(i, f"/bin/p{i}")) for i in range(8)]
    procs.append(attributes(Proc(99, "/bin/k"), process_executable_path=""))
    data = request(procs)
    decoder = _durable_decoder(data)
    for _ in range(2):
        result = decoder.decode(data, BOUNDS)
        assert result.untracked["missing_field"].points == POINTS_PER_PROC
        assert result.points_accepted == 8 * POINTS_PER_PROC
        assert result.resources_tracked == 8


# -- host filter (identity binding) ------------------------------------------------------------


def only(*hosts: str) -> Callable[[str], bool]:
    return lambda host: host in hosts


def test_host_filter_refuses_other_hosts() -> None:
    """With a host filter, a resource whose host.name it refuses is not stored: its points
    are rejected as host_mismatch with the message the sender sees."""
    data = request([attributes(IMPLANT, host_name="node-2"), attributes(GOOD)])
    result = decode(data, host_filter=only("node-1"))
    assert keys(result) == {key_of(GOOD)}
    u = result.untracked["host_mismatch"]
    assert (u.resources, u.points, u.example) == (1, POINTS_PER_PROC, "node-2")
    assert rejection_message(result, BOUNDS) == (
        f"pathwatch rejected {POINTS_PER_PROC} data points: {POINTS_PER_PROC} data points from "
        "resources whose host.name is not in the client certificate"
    )


def test_host_filter_refuses_resources_without_host() -> None:
    """Without host.name a resource cannot prove its host: refused as host_mismatch, even
    though host.name is also a missing key field."""
    result = decode(request([attributes(IMPLANT, host_name=None)]), host_filter=only("node-1"))
    assert set(result.untracked) == {"host_mismatch"}


def test_host_filter_reads_host_name_when_no_rule_keys_on_it() -> None:
    """host.name is decoded for the filter even when no rule's key has it."""
    by_path = dataclasses.replace(
        PARITY_RULE, id="by_path", key_fields=("process.executable.path",)
    )
    decoder = Decoder([by_path])
    data = request([attributes(IMPLANT, host_name="node-2"), attributes(GOOD)])
    result = decode(data, decoder, host_filter=only("node-1"))
    assert keys(result) == {("/usr/bin/containerd",)}
    assert result.untracked["host_mismatch"].resources == 1


def test_host_filter_sees_escaped_host_name() -> None:
    """A host.name that is not UTF-8 reaches the filter escaped (and cannot match a name in
    a certificate by accident)."""
    seen: list[str] = []

    def refuse(host: str) -> bool:
        seen.append(host)
        return False

    decode(request([attributes(IMPLANT, host_name=b"node-\xff")]), host_filter=refuse)
    assert seen[0] == "node-\\xff"


def test_host_filter_skips_the_fast_path() -> None:
    """A resource durable from an unfiltered request is still refused under a filter."""
    data = request([attributes(Proc(i, f"/bin/p{i}", host="node-2")) for i in range(8)])
    decoder = _durable_decoder(data)
    assert not decoder.decode(data, BOUNDS).batch  # durable: the fast path answers
    result = decoder.decode(data, BOUNDS, host_filter=only("node-1"))
    assert result.untracked["host_mismatch"].resources == 8
    assert result.points_accepted == 0 and not result.marks


def test_invalid_resource_is_invalid_even_under_a_host_filter() -> None:
    """A Resource that does not decode is reported as invalid, the more precise reason."""
    rm = process_request([Proc(0, "/x")], NOW).resource_metrics[0]
    rm.ClearField("resource")
    garbage = _ld(1, _ld(1, b"\x0a\xff\xff\xff\x0f") + rm.SerializeToString())
    assert set(decode(garbage, host_filter=only("node-1")).untracked) == {"invalid"}


# -- accounting and the log --------------------------------------------------------------------


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_counters_split_untracked_resources_by_reason() -> None:
    """count_decoded adds untracked resources by reason and zero-timestamp and host-mismatch
    points to their outcomes, beside the totals it always kept."""
    rm = process_request([Proc(0, "/x")], NOW).resource_metrics[0]
    rm.scope_metrics[0].metrics[1].sum.data_points[0].time_unix_nano = 0
    data = request(
        [
            attributes(IMPLANT, process_pid=None),
            attributes(GOOD),
            attributes(Proc(5, "/bin/z"), host_name="elsewhere"),
        ],
        resource_metrics=rm,
    )
    result = Decoder([PARITY_RULE]).decode(data, BOUNDS, host_filter=only("node-1"))
    metrics = Metrics()
    count_decoded(metrics, result, RejectionLog(lambda: 0.0))
    assert _sample(metrics, "pathwatch_resources_untracked_total", reason="missing_field") == 1
    assert _sample(metrics, "pathwatch_resources_untracked_total", reason="host_mismatch") == 1
    assert _sample(metrics, "pathwatch_resources_total", outcome="untracked") == 2
    assert _sample(metrics, "pathwatch_resources_total", outcome="tracked") == 1
    assert _sample(metrics, "pathwatch_data_points_total", outcome="zero_timestamp") == 1
    assert (
        _sample(metrics, "pathwatch_data_points_total", outcome="host_mismatch") == POINTS_PER_PROC
    )
    assert (
        _sample(metrics, "pathwatch_data_points_total", outcome="accepted") == POINTS_PER_PROC - 1
    )


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rejection_log_is_rate_limited_per_reason() -> None:
    """One line per reason per minute at most, each carrying the counts since the previous
    line and an example attribute; other reasons have their own budget."""
    clock = FakeMonotonic()
    log = RejectionLog(clock, interval=60.0)
    missing = Decoder([PARITY_RULE]).decode(
        request([attributes(IMPLANT, process_pid=None)]), BOUNDS
    )
    bad_host = Decoder([PARITY_RULE]).decode(
        request([attributes(GOOD, host_name="rogue")]), BOUNDS, host_filter=only("node-1")
    )
    with capture_logs() as logs:
        log.record(missing)  # first: logged at once
        for _ in range(5):
            clock.now += 10
            log.record(missing)  # inside the minute: counted, not logged
        log.record(bad_host)  # another reason: its own line
        clock.now += 10  # 60 s after the first line
        log.record(missing)
    lines = [(e["reason"], e["resources"], e["points"], e["example"]) for e in logs]
    assert lines == [
        ("missing_field", 1, POINTS_PER_PROC, "process.pid"),
        ("host_mismatch", 1, POINTS_PER_PROC, "rogue"),
        ("missing_field", 6, 6 * POINTS_PER_PROC, "process.pid"),
    ]
    assert all(e["log_level"] == "warning" for e in logs)


def test_rejection_log_names_points_without_timestamp() -> None:
    """Points without a timestamp get their own rate-limited line."""
    rm = process_request([Proc(0, "/x")], NOW).resource_metrics[0]
    rm.scope_metrics[0].metrics[1].sum.data_points[0].time_unix_nano = 0
    result = Decoder([PARITY_RULE]).decode(
        request([attributes(IMPLANT)], resource_metrics=rm), BOUNDS
    )
    with capture_logs() as logs:
        RejectionLog(FakeMonotonic()).record(result)
    assert [(e["reason"], e["points"]) for e in logs] == [("zero_timestamp", 1)]


# -- any bytes -------------------------------------------------------------------------------


@SETTINGS
@given(
    path=st.binary(max_size=64),
    name=st.binary(max_size=16),
    other=st.binary(max_size=64),
    key=st.binary(max_size=16),
)
@example(path=b"/tmp/\xff\xfe/implant", name=b"implant", other=b"\x80", key=b"\xc0")
@example(path=b"\\xff", name=b"\xff", other=b"", key=b"process.pid")
def test_any_bytes_in_attribute_values_round_trip(
    path: bytes, name: bytes, other: bytes, key: bytes
) -> None:
    """Whatever the bytes of key fields, of another attribute and of another attribute's
    name, decoding never raises, and a non-empty key field comes back as its bytes decoded
    with backslashreplace (an empty one is a missing field)."""
    attrs = attributes(IMPLANT, process_executable_path=path, process_executable_name=name)
    data = request([[(key, other), *attrs]])  # a repeated name: the later value counts
    result = decode(data)
    if path and name:
        expected = ("node-1", "prod", "node-1", "31337", path, name)
        escaped = tuple(
            v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v for v in expected
        )
        assert keys(result) == {escaped}
        assert result.points_rejected == 0
    else:
        assert result.batch == {}
        assert result.untracked["missing_field"].points == POINTS_PER_PROC
