"""Flood guards: a node inventing keys, and a tick with too many alerts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.test_delivery import metric
from tests.support import (
    HttpSink,
    Proc,
    ServiceProcess,
    export,
    minute_floor,
    process_request,
    wait_drained,
)

pytestmark = pytest.mark.integration


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def keys_of(svc: ServiceProcess, host: str) -> int:
    _, body = svc.api("GET", "/api/v1/keys?path=/flood/*&limit=10000")
    return sum(1 for k in body["keys"] if k["key"]["host.name"] == host)


def test_new_key_limit_per_host(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """Past the per-host cap, new keys are accepted but not tracked, other hosts are not
    affected, and exactly one summary alert names the host."""
    svc = service_factory(
        tmp_path / "data",
        {"limits": {"new_keys_per_host_per_hour": 5},
         "sinks": [{"name": "soc", "type": "webhook", "url": sink.url}]},
    ).start()  # fmt: skip
    t = now_ms() - 60_000
    flood = [Proc(i, f"/flood/{i}", host="node-bad") for i in range(20)]
    resp = export(svc.grpc_port, process_request(flood, t))
    assert resp.partial_success.rejected_data_points == 0  # accepted, just not tracked
    export(svc.grpc_port, process_request([Proc(i, f"/flood/x{i}", host="node-ok")
                                           for i in range(3)], t))  # fmt: skip
    export(svc.grpc_port, process_request([Proc(99, "/flood/more", host="node-bad")], t))
    assert keys_of(svc, "node-bad") == 5
    assert keys_of(svc, "node-ok") == 3
    (got,) = sink.wait_for(1)
    event = got.json()
    assert event["kind"] == "new_key_limit" and event["risk_object"] == "node-bad"
    assert "New-key limit reached on host node-bad" in event["risk_message"]
    wait_drained(svc)
    assert len(sink.received) == 1
    assert metric(svc, "pathwatch_keys_refused_total") == 16
    assert metric(svc, "pathwatch_key_limit_hits_total", scope="host") == 1


def test_new_key_limit_for_the_fleet(tmp_path: Path, service_factory: type[ServiceProcess]) -> None:
    """Past the fleet-wide cap, new keys from any host are not tracked; one summary alert
    with risk object '*' is recorded."""
    svc = service_factory(tmp_path / "data", {"limits": {"new_keys_per_hour": 4}}).start()
    t = now_ms() - 60_000
    export(svc.grpc_port, process_request(
        [Proc(i, f"/flood/{i}", host=f"node-{i}") for i in range(10)], t))  # fmt: skip
    _, body = svc.api("GET", "/api/v1/keys?path=/flood/*&limit=100")
    assert len(body["keys"]) == 4
    _, alerts = svc.api("GET", "/api/v1/alerts")
    (summary,) = [a for a in alerts["alerts"] if a.get("kind") == "new_key_limit"]
    assert summary["risk_object"] == "*"


def test_alert_flood_is_summarised(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """Past max_alerts_per_tick, the rest of the tick's alerts are recorded and counted and
    one summary alert is delivered in their place."""
    svc = service_factory(
        tmp_path / "data",
        {"limits": {"max_alerts_per_tick": 3},
         "sinks": [{"name": "soc", "type": "webhook", "url": sink.url}]},
    ).start()  # fmt: skip
    t = minute_floor(now_ms())
    export(svc.grpc_port, process_request([Proc(i, f"/tmp/x{i}") for i in range(10)], t - 60_000))
    result = svc.evaluate(t)
    assert len(result["alerts"]) == 11
    got = sink.wait_for(4)
    wait_drained(svc)
    assert len(sink.received) == 4
    summary = next(r.json() for r in got if r.json().get("kind") == "alert_flood")
    assert summary["suppressed"] == 7
    assert len(summary["suppressed_ids"]) == 7
    assert metric(svc, "pathwatch_alerts_summarised_total",
                  rule="kubernetes_process_running_from_new_path") == 7  # fmt: skip
