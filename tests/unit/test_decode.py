"""Decoder over real collector output: which processes are tracked, when, and what is refused."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import ResourceMetrics

from pathwatch.clock import MINUTE_MS
from pathwatch.receiver.decode import Decoder, DecodeResult, InvalidRequest, TimeBounds
from pathwatch.rules.builtin import PARITY_RULE, PARITY_RULE_ID

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=300)

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
if not FIXTURES.exists():
    FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROCESS_YAML = FIXTURES / "otelcol-contrib" / "expected_process.yaml"
OTLP_EXAMPLE = FIXTURES / "otlp-examples" / "metrics.json"

NOW = 1_700_000_000_000 + 12_345  # the decoder's "now": fixed, so the test is deterministic
BOUNDS = TimeBounds(oldest_ms=NOW - 3_600_000, newest_ms=NOW + 300_000)
KEY_SLEEP = ("node-1", "prod", "node-1", "95041", "/bin/sleep", "sleep")
KEY_BARE = ("node-1", "prod", "node-1", "4668", "sleep", "sleep")


def _load_fixture() -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    json_format.ParseDict(yaml.safe_load(PROCESS_YAML.read_text()), req)
    return req


_FIXTURE = _load_fixture()


def points(rm: ResourceMetrics, name_prefix: str = "") -> list:
    out = []
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            if m.name.startswith(name_prefix):
                kind = m.WhichOneof("data")
                out.extend(getattr(m, kind).data_points)
    return out


def attr(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def set_attr(rm: ResourceMetrics, key: str, value: str | int) -> None:
    for kv in rm.resource.attributes:
        if kv.key == key:
            kv.CopyFrom(attr(key, value))
            return
    rm.resource.attributes.append(attr(key, value))


def process_request(time_ms: int = NOW, host: str | None = "node-1") -> ExportMetricsServiceRequest:
    """The collector's golden output at `time_ms`, with the attributes processors would add."""
    req = copy.deepcopy(_FIXTURE)
    for rm in req.resource_metrics:
        if host is not None:
            rm.resource.attributes.extend(
                [
                    attr("host.name", host),
                    attr("k8s.cluster.name", "prod"),
                    attr("k8s.node.name", host),
                ]
            )
        for dp in points(rm):
            dp.time_unix_nano = time_ms * 1_000_000
    return req


def decode(
    req: ExportMetricsServiceRequest, decoder: Decoder | None = None, bounds: TimeBounds = BOUNDS
) -> DecodeResult:
    decoder = decoder or Decoder([PARITY_RULE])
    result = decoder.decode(req.SerializeToString(), bounds)
    again = decoder.decode(req.SerializeToString(), bounds)  # caches must not change answers
    assert again == result
    return result


def summary(result: DecodeResult) -> dict:
    return {
        rk: (sorted(s.minutes), s.first_ms, s.last_ms) for rk, s in sorted(result.batch.items())
    }


def test_fixture_has_the_shape_the_tests_assume() -> None:
    """The golden collector output holds two process resources without host attributes."""
    assert len(_FIXTURE.resource_metrics) == 2
    for rm in _FIXTURE.resource_metrics:
        keys = {kv.key for kv in rm.resource.attributes}
        assert "process.pid" in keys and "host.name" not in keys
        assert points(rm, "process.")


def test_processes_without_host_attributes_are_untracked() -> None:
    """Collector output without host/cluster/node attributes produces no observations; its
    points are rejected as from resources missing a key field."""
    req = process_request(host=None)
    result = decode(req)
    assert result.batch == {}
    assert result.resources_untracked == 2
    assert result.resources_tracked == 0
    assert result.resources_ignored == 0
    n_points = sum(len(points(rm, "process.")) for rm in req.resource_metrics)
    assert result.untracked["missing_field"].fields == ["host.name"]  # the first key field
    assert result.points_rejected == n_points and result.points_accepted == 0


def test_processes_with_host_attributes_are_tracked() -> None:
    """Each process of the collector's output is observed once per minute under its full key."""
    req = process_request()
    result = decode(req)
    assert result.resources_tracked == 2 and result.resources_untracked == 0
    minute = NOW // MINUTE_MS
    assert summary(result) == {
        (PARITY_RULE_ID, KEY_BARE): ([minute], NOW, NOW),
        (PARITY_RULE_ID, KEY_SLEEP): ([minute], NOW, NOW),
    }
    assert result.points_accepted == sum(len(points(rm, "process.")) for rm in req.resource_metrics)
    assert result.points_rejected == 0


def test_decode_message_agrees_with_decode() -> None:
    """Decoding a parsed request gives the same answer as decoding its bytes."""
    req = process_request()
    assert Decoder([PARITY_RULE]).decode_message(req, BOUNDS) == decode(req)


def test_int_and_string_pid_make_the_same_key() -> None:
    """A pid sent as an integer or as a string identifies the same process."""
    as_int = process_request()
    as_str = process_request()
    for rm in as_str.resource_metrics:
        (pid,) = [kv.value.int_value for kv in rm.resource.attributes if kv.key == "process.pid"]
        set_attr(rm, "process.pid", str(pid))
    assert summary(decode(as_str)) == summary(decode(as_int))


def test_empty_key_field_is_untracked() -> None:
    """A process with an empty executable path (a kernel thread) is not tracked, and counted."""
    req = process_request()
    set_attr(req.resource_metrics[0], "process.executable.path", "")
    result = decode(req)
    assert set(result.batch) == {(PARITY_RULE_ID, KEY_BARE)}
    assert result.resources_untracked == 1 and result.resources_tracked == 1


def test_missing_key_field_is_untracked() -> None:
    """A process without an executable name attribute is not tracked."""
    req = process_request()
    rm = req.resource_metrics[1]
    kept = [kv for kv in rm.resource.attributes if kv.key != "process.executable.name"]
    del rm.resource.attributes[:]
    rm.resource.attributes.extend(kept)
    result = decode(req)
    assert set(result.batch) == {(PARITY_RULE_ID, KEY_SLEEP)}
    assert result.resources_untracked == 1


def _otlp_example() -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    json_format.ParseDict(json.loads(OTLP_EXAMPLE.read_text()), req)
    return req


def test_otlp_spec_example_is_accepted_and_ignored() -> None:
    """The OTLP specification's sample (no process metrics) is accepted and yields nothing."""
    result = decode(_otlp_example())
    assert result.batch == {}
    assert result.resources_ignored == 1
    assert result.resources_tracked == result.resources_untracked == 0
    assert result.points_accepted == 0 and result.points_rejected == 0


def test_non_process_resource_beside_processes_is_ignored() -> None:
    """A non-process resource in the same export is ignored; the processes are still tracked."""
    req = process_request()
    req.resource_metrics.extend(_otlp_example().resource_metrics)
    result = decode(req)
    assert set(result.batch) == {(PARITY_RULE_ID, KEY_SLEEP), (PARITY_RULE_ID, KEY_BARE)}
    assert result.resources_ignored == 1 and result.resources_tracked == 2


def test_non_process_metrics_of_a_process_are_ignored() -> None:
    """Metrics not named process.* neither count as points nor add minutes."""
    req = process_request()
    rm = req.resource_metrics[0]
    n_process = len(points(rm, "process."))
    other = rm.scope_metrics[0].metrics.add(name="system.cpu.time")
    dp = other.sum.data_points.add(time_unix_nano=(NOW - 10 * MINUTE_MS) * 1_000_000, as_double=1)
    del dp  # only its time matters
    gauge = rm.scope_metrics[0].metrics.add(name="container.cpu.usage")
    gauge.gauge.data_points.add(time_unix_nano=(NOW - 20 * MINUTE_MS) * 1_000_000, as_int=1)
    result = decode(req)
    assert summary(result)[(PARITY_RULE_ID, KEY_SLEEP)] == ([NOW // MINUTE_MS], NOW, NOW)
    assert result.points_accepted == n_process + len(points(req.resource_metrics[1], "process."))


def test_resource_with_only_non_process_metrics_is_ignored() -> None:
    """A process resource that reports no process.* metric is ignored, not tracked."""
    req = process_request()
    rm = req.resource_metrics[0]
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            m.name = "system." + m.name
    result = decode(req)
    assert set(result.batch) == {(PARITY_RULE_ID, KEY_BARE)}
    assert result.resources_ignored == 1


def test_renamed_and_optional_process_metrics_count() -> None:
    """Newer or optional process.* metrics (gauges included) count like the default ones."""
    req = process_request()
    rm = req.resource_metrics[0]
    del rm.scope_metrics[0].metrics[:]
    m = rm.scope_metrics[0].metrics.add(name="process.thread.count")
    m.gauge.data_points.add(time_unix_nano=NOW * 1_000_000, as_int=4)
    result = decode(req)
    assert summary(result)[(PARITY_RULE_ID, KEY_SLEEP)] == ([NOW // MINUTE_MS], NOW, NOW)


def test_metric_globs_select_which_points_count() -> None:
    """A rule counting only process.memory.* ignores cpu points; each rule sees its own minutes."""
    mem_rule = dataclasses.replace(PARITY_RULE, id="memory_only", metrics=("process.memory.*",))
    req = process_request()
    cpu_time = NOW - 5 * MINUTE_MS
    for rm in req.resource_metrics:
        for dp in points(rm, "process.cpu."):
            dp.time_unix_nano = cpu_time * 1_000_000
    both = decode(req, Decoder([PARITY_RULE, mem_rule]))
    got = summary(both)
    minute = NOW // MINUTE_MS
    assert got[("memory_only", KEY_SLEEP)] == ([minute], NOW, NOW)
    assert got[(PARITY_RULE_ID, KEY_SLEEP)] == ([cpu_time // MINUTE_MS, minute], cpu_time, NOW)
    only_mem = decode(req, Decoder([mem_rule]))
    assert set(only_mem.batch) == {("memory_only", KEY_SLEEP), ("memory_only", KEY_BARE)}
    assert only_mem.points_accepted == sum(
        len(points(rm, "process.memory.")) for rm in req.resource_metrics
    )


def test_disabled_rule_observes_nothing() -> None:
    """A disabled rule gets no observations."""
    off = dataclasses.replace(PARITY_RULE, enabled=False)
    assert decode(process_request(), Decoder([off])).batch == {}


def test_points_outside_time_bounds_are_rejected_and_counted() -> None:
    """Points older or newer than the accepted range are counted as rejected; the rest are kept."""
    req = process_request()
    rm = req.resource_metrics[0]
    oldest_ns = BOUNDS.oldest_ms * 1_000_000
    newest_ns = BOUNDS.newest_ms * 1_000_000
    times = [
        oldest_ns - 1,  # 1 ns too old
        oldest_ns,  # the oldest accepted instant
        newest_ns + 999_999,  # the last nanosecond of the newest accepted millisecond
        newest_ns + 1_000_000,  # 1 ms too new
        NOW * 1_000_000,
    ]
    pts = points(rm)
    assert len(pts) >= len(times)
    for i, dp in enumerate(pts):
        dp.time_unix_nano = times[i % len(times)]
    expected_old = sum(1 for i in range(len(pts)) if i % len(times) == 0)
    expected_future = sum(1 for i in range(len(pts)) if i % len(times) == 3)
    result = decode(req)
    assert result.points_too_old == expected_old
    assert result.points_future == expected_future
    assert result.points_rejected == expected_old + expected_future
    total = sum(len(points(r, "process.")) for r in req.resource_metrics)
    assert result.points_accepted == total - expected_old - expected_future
    minutes, first, last = summary(result)[(PARITY_RULE_ID, KEY_SLEEP)]
    assert (first, last) == (BOUNDS.oldest_ms, BOUNDS.newest_ms)
    assert minutes == sorted(
        {BOUNDS.oldest_ms // MINUTE_MS, BOUNDS.newest_ms // MINUTE_MS, NOW // MINUTE_MS}
    )


def test_all_points_too_old_adds_nothing() -> None:
    """A process whose points are all too old produces no observation."""
    req = process_request(time_ms=BOUNDS.oldest_ms - 1)
    result = decode(req)
    assert result.batch == {}
    assert result.points_too_old == sum(len(points(r, "process.")) for r in req.resource_metrics)
    assert result.points_accepted == 0


@pytest.mark.parametrize(
    "data",
    [b"\xff\xff\xff\xff", b"\x0a\x05abc", b"\x0a\xff\xff\xff\xff\x0f", b"\x07", b"\x0a\x02\x0a"],
    ids=["bad-tag", "truncated", "huge-length", "wire-type-7", "nested-truncated"],
)
def test_garbage_bytes_are_an_invalid_request(data: bytes) -> None:
    """Bytes that are not an export request are refused as invalid, not crashed on."""
    with pytest.raises(InvalidRequest):
        Decoder([PARITY_RULE]).decode(data, BOUNDS)


@SETTINGS
@given(st.binary(max_size=200))
@example(b"")
@example(b"\x0a\x00")
def test_random_bytes_never_crash(data: bytes) -> None:
    """Any bytes either decode or raise InvalidRequest; nothing else escapes."""
    try:
        result = Decoder([PARITY_RULE]).decode(data, BOUNDS)
    except InvalidRequest:
        return
    assert isinstance(result, DecodeResult)


@pytest.mark.parametrize(
    ("host", "accepted"),
    [
        ("h" * 16, True),
        ("h" * 17, False),
        ("\u00e9" * 8, True),  # 16 bytes
        ("\u00e9" * 9, False),  # 9 characters but 18 bytes
        ("\U0001f600" * 5, False),  # 5 characters, 20 bytes
    ],
)
def test_key_field_over_the_cap_rejects_the_resource(host: str, accepted: bool) -> None:
    """A key field over max_key_field_bytes (UTF-8 bytes) rejects that process's points."""
    req = process_request()
    set_attr(req.resource_metrics[0], "host.name", host)
    set_attr(req.resource_metrics[0], "k8s.node.name", "n")
    n_points = len(points(req.resource_metrics[0], "process."))
    result = decode(req, Decoder([PARITY_RULE], max_key_field_bytes=16))
    keys = {k for _, k in result.batch}
    assert ((host, "prod", "n", "95041", "/bin/sleep", "sleep") in keys) is accepted
    assert KEY_BARE in keys
    if accepted:
        assert result.points_key_too_long == 0
    else:
        assert result.points_key_too_long == n_points
        assert result.points_rejected == n_points
        assert result.resources_untracked == 1
