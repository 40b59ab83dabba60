"""No input makes a process invisible, through the real service over real gRPC: a path that is
not UTF-8 is stored and alerts; a resource without a key field and a point without a timestamp
are answered with a partial_success that says why, counted and logged."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms

from tests.support import EXPORT, Proc, ServiceProcess, minute_floor, process_request, wait_until

pytestmark = pytest.mark.integration

PLACEHOLDER = b"/tmp/XX/implant"
NOT_UTF8 = b"/tmp/\xff\xfe/implant"  # same length: the wire lengths stay right
ESCAPED = "/tmp/\\xff\\xfe/implant"
POINTS_PER_PROC = 4  # tests.support.process_request: 3 cpu time points, 1 memory point


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def raw_export(svc: ServiceProcess, payload: bytes) -> ms.ExportMetricsServiceResponse:
    """Send bytes as they are (the generated classes refuse a str that is not UTF-8)."""
    with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as ch:
        call = ch.unary_unary(
            EXPORT, response_deserializer=ms.ExportMetricsServiceResponse.FromString
        )
        response: ms.ExportMetricsServiceResponse = call(payload, timeout=10)
        return response


def metric(svc: ServiceProcess, series: str) -> float:
    _, text = svc.api("GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return 0.0


def stored_paths(svc: ServiceProcess, pattern: str) -> set[str]:
    status, body = svc.api("GET", f"/api/v1/keys?path={pattern}&limit=1000")
    assert status == 200, body
    return {k["key"]["process.executable.path"] for k in body["keys"]}


def log_events(svc: ServiceProcess, event_part: str) -> list[dict[str, Any]]:
    out = []
    for line in list(svc.lines):
        if event_part in line and line.startswith("{"):
            out.append(json.loads(line))
    return out


def past_tick() -> tuple[int, int]:
    """(tick, point time): a whole minute 5 minutes back, whose window and the rule's delay
    have passed, and a time 5 minutes inside its window."""
    tick = minute_floor(now_ms()) - 5 * 60_000
    return tick, tick - 5 * 60_000


def test_path_that_is_not_utf8_is_stored_and_alerts(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """A process whose executable path (and command line) holds bytes that are not UTF-8 is
    accepted with nothing rejected, stored under its escaped path, and alerts as new."""
    svc = service_factory(tmp_path / "data").start()
    tick, t = past_tick()
    req = process_request([Proc(31337, PLACEHOLDER.decode()), Proc(7, "/usr/bin/ok")], t)
    payload = req.SerializeToString()
    assert payload.count(PLACEHOLDER) == 3  # path, command, command line
    resp = raw_export(svc, payload.replace(PLACEHOLDER, NOT_UTF8))
    assert resp.partial_success.rejected_data_points == 0

    assert stored_paths(svc, "/tmp/*") == {ESCAPED}
    alerts = svc.evaluate(tick)["alerts"]
    paths = {a["fields"]["process.executable.path"] for a in alerts}
    assert paths == {ESCAPED, "/usr/bin/ok"}
    assert metric(svc, 'pathwatch_resources_total{outcome="tracked"}') == 2


def test_resource_without_pid_gets_partial_success_naming_the_field(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """A resource missing process.pid is refused through partial_success naming the field,
    counted by reason, and logged once with the field as example; the process beside it is
    stored."""
    svc = service_factory(tmp_path / "data").start()
    _, t = past_tick()
    req = process_request([Proc(1, "/tmp/nopid"), Proc(2, "/usr/bin/ok")], t)
    attrs = req.resource_metrics[0].resource.attributes
    kept = [kv for kv in attrs if kv.key != "process.pid"]
    del attrs[:]
    attrs.extend(kept)
    resp = raw_export(svc, req.SerializeToString())

    assert resp.partial_success.rejected_data_points == POINTS_PER_PROC
    message = resp.partial_success.error_message
    assert f"{POINTS_PER_PROC} data points from 1 resource without key field process.pid" in message
    assert stored_paths(svc, "/*") == {"/usr/bin/ok"}
    untracked = 'pathwatch_resources_untracked_total{reason="missing_field"}'
    assert metric(svc, untracked) == 1
    (event,) = wait_until(lambda: log_events(svc, "yield no key"), timeout=10)
    assert (event["reason"], event["example"], event["component"]) == (
        "missing_field",
        "process.pid",
        "receiver",
    )


def test_point_with_timestamp_zero_gets_partial_success(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """A data point whose time_unix_nano is 0 is rejected through partial_success that says
    so and counted as zero_timestamp; the process's other points are stored."""
    svc = service_factory(tmp_path / "data").start()
    _, t = past_tick()
    req = process_request([Proc(3, "/usr/bin/zero")], t)
    req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0].time_unix_nano = 0
    resp = raw_export(svc, req.SerializeToString())

    assert resp.partial_success.rejected_data_points == 1
    assert "1 without a timestamp (time_unix_nano 0)" in resp.partial_success.error_message
    assert metric(svc, 'pathwatch_data_points_total{outcome="zero_timestamp"}') == 1
    assert metric(svc, 'pathwatch_data_points_total{outcome="accepted"}') == POINTS_PER_PROC - 1
    assert stored_paths(svc, "/usr/bin/*") == {"/usr/bin/zero"}
