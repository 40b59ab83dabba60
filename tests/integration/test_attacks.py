"""Issue 11's attacks on the running service, over real gRPC and OTLP/HTTP: backdating, floods
that would swallow the real key, early evaluation and late data.

The collector and the attacker are different senders: the collector exports over gRPC from
127.0.0.1, the attacker over OTLP/HTTP from another loopback address (127.0.0.2), as another pod
of the cluster would from its own address.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    RULE,
    Proc,
    ServiceProcess,
    export,
    minute_floor,
    now_ms,
    process_request,
)

IMPLANT = Proc(31337, "/tmp/.x/kworkerd", host="node-victim")
ATTACKER_ADDRESS = "127.0.0.2"


def attacker_export(svc: ServiceProcess, procs: list[Proc], at_ms: int) -> dict[str, Any]:
    """OTLP/HTTP protobuf from the attacker's own address; returns status and body size."""
    body = process_request(procs, at_ms).SerializeToString()
    conn = http.client.HTTPConnection(
        "127.0.0.1", svc.otlp_http_port, timeout=10, source_address=(ATTACKER_ADDRESS, 0)
    )
    try:
        conn.request("POST", "/v1/metrics", body, {"Content-Type": "application/x-protobuf"})
        response = conn.getresponse()
        response.read()
        return {"status": response.status}
    finally:
        conn.close()


def paths_of(alerts: list[dict[str, Any]]) -> list[str]:
    return [
        a["fields"]["process.executable.path"]
        for a in alerts
        if "process.executable.path" in a.get("fields", {})
    ]


def stored(svc: ServiceProcess, path: str) -> bool:
    status, body = svc.api("GET", f"/api/v1/keys?path={path}")
    assert status == 200, body
    return bool(body["keys"])


@pytest.fixture
def service(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServiceProcess]:
    config = getattr(request, "param", {})
    svc = ServiceProcess(tmp_path / "data", config).start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.mark.parametrize(
    "service",
    [{"receiver": {"max_baseline_lateness": "1h"}}],
    indirect=True,
)
def test_backdated_export_does_not_hide_the_implant(service: ServiceProcess) -> None:
    """Finding 1: the attacker exports the implant's key stamped 10 days ago before the
    collector reports it running; the tick still alerts it, saying its history arrived late."""
    svc = service
    t = minute_floor(now_ms())
    forged = process_request([IMPLANT], t - 10 * 86_400_000)
    export(svc.grpc_port, forged)
    export(svc.grpc_port, process_request([IMPLANT], t - 60_000))
    alerts = svc.evaluate(t)["alerts"]
    on_time = [a for a in alerts if not a.get("late")]
    assert paths_of(on_time) == [IMPLANT.path]
    assert on_time[0]["context"]["earlier_history_late"] is True


@pytest.mark.parametrize("service", [{"limits": {"new_keys_per_host_per_hour": 50}}], indirect=True)
def test_junk_keys_of_another_sender_do_not_use_up_the_victims_budget(
    service: ServiceProcess,
) -> None:
    """Finding 3: 60 junk keys under host.name=node-victim from the attacker's address do not
    keep the collector's report of the real implant out of the store, and it alerts."""
    svc = service
    t = minute_floor(now_ms())
    junk = [Proc(1000 + i, f"/usr/lib/junk-{i:03d}", host="node-victim") for i in range(60)]
    assert attacker_export(svc, junk, t - 120_000)["status"] == 200
    export(svc.grpc_port, process_request([IMPLANT], t - 60_000))
    assert stored(svc, IMPLANT.path)
    assert IMPLANT.path in paths_of(svc.evaluate(t)["alerts"])


@pytest.mark.parametrize("service", [{"limits": {"new_keys_per_host_per_hour": 50}}], indirect=True)
def test_key_refused_by_a_cap_is_listed_at_the_next_tick(service: ServiceProcess) -> None:
    """Finding 3: when the flood and the implant come from the same sender (a compromised node
    floods its own host), the refused implant is still named, in the tick's summary of refused
    keys, suspicious locations first."""
    svc = service
    t = minute_floor(now_ms())
    junk = [Proc(1000 + i, f"/usr/lib/junk-{i:03d}", host="node-victim") for i in range(60)]
    export(svc.grpc_port, process_request(junk, t - 120_000))
    export(svc.grpc_port, process_request([IMPLANT], t - 60_000))
    assert not stored(svc, IMPLANT.path)
    alerts = svc.evaluate(t)["alerts"]
    (summary,) = [a for a in alerts if a.get("kind") == "refused_keys"]
    assert summary["refused_keys"][0] == {"host": "node-victim", "path": IMPLANT.path}
    assert summary["refused"] == 11


@pytest.mark.parametrize(
    "service",
    [{"limits": {"new_keys_per_sender_per_hour": 100, "new_keys_per_hour": 1000}}],
    indirect=True,
)
def test_rotating_host_names_cannot_exhaust_the_fleet_budget(service: ServiceProcess) -> None:
    """Finding 3: an attacker rotating fake host names exhausts its own budget, not the
    fleet's: the collector's new keys are still tracked."""
    svc = service
    t = minute_floor(now_ms())
    for batch in range(3):
        fake = [Proc(i, f"/bin/fake-{batch}-{i}", host=f"fake-{batch}-{i}") for i in range(400)]
        assert attacker_export(svc, fake, t - 120_000)["status"] == 200
    export(svc.grpc_port, process_request([IMPLANT], t - 60_000))
    assert stored(svc, IMPLANT.path)
    _, text = _metrics(svc)
    assert 'pathwatch_key_limit_hits_total{scope="sender"} 1.0' in text


@pytest.mark.parametrize("service", [{"limits": {"max_alerts_per_tick": 5}}], indirect=True)
def test_per_tick_cap_delivers_the_implant_and_lists_every_held_back_key(
    service: ServiceProcess,
) -> None:
    """Finding 3: past the per-tick cap the most suspicious paths are alerted one by one, the
    summary lists every held-back key by host and path, and each stays readable via the API."""
    svc = service
    from tests.support import iso

    t = minute_floor(now_ms())
    junk = [Proc(1000 + i, f"/aaa/junk-{i:03d}", host="node-a") for i in range(20)]
    export(svc.grpc_port, process_request([*junk, IMPLANT], t - 60_000))
    alerts = svc.evaluate(t)["alerts"]
    (flood,) = [a for a in alerts if a.get("kind") == "alert_flood"]
    assert flood["suppressed"] == 16
    assert len(flood["suppressed_keys"]) == 16
    delivered = set(a["id"] for a in alerts) - set(flood["suppressed_ids"]) - {flood["id"]}
    assert IMPLANT.path in paths_of([a for a in alerts if a["id"] in delivered])
    status, listed = svc.api("GET", f"/api/v1/alerts?since={iso(t - 60_000)}")
    assert status == 200
    assert {a["id"] for a in listed["alerts"]} >= set(flood["suppressed_ids"])


def test_early_evaluation_is_refused_and_late_points_alert_at_the_next_tick(
    tmp_path: Path,
) -> None:
    """Finding 4: `evaluate` for a tick whose delay has not passed answers 400 and records
    nothing; a point that arrives after its tick ran is alerted at the next tick, marked late."""
    rules = [{"id": RULE, "delay": "5m", "schedule": "* * * * *", "window": "1m"}]
    svc = ServiceProcess(tmp_path / "data", {"rules": rules}).start()
    try:
        t = minute_floor(now_ms())
        status, body = svc.api("POST", f"/api/v1/rules/{RULE}/evaluate?at={_iso(t)}")
        assert status == 400 and "can run from" in body["error"]
        earlier = t - 10 * 60_000
        assert svc.evaluate(earlier)["alerts"] == []
        export(svc.grpc_port, process_request([IMPLANT], earlier - 20_000))
        later = earlier + 60_000
        alerts = svc.evaluate(later)["alerts"]
        assert paths_of(alerts) == [IMPLANT.path]
        assert alerts[0]["late"] is True
        assert alerts[0]["window"]["end"] == _iso(earlier)
        assert svc.evaluate(later + 60_000)["alerts"] == []
    finally:
        svc.stop()


def _iso(ms: int) -> str:
    from tests.support import iso

    return iso(ms)


def _metrics(svc: ServiceProcess) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()
