"""Issue 13: no alert flood on a fresh install, and a dry run that records nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    RULE,
    Proc,
    ServiceProcess,
    export,
    iso,
    minute_floor,
    now_ms,
    process_request,
)

FLEET = [Proc(100 + i, f"/usr/bin/daemon-{i:02d}") for i in range(12)]
IMPLANT = Proc(31337, "/tmp/.x/kworkerd")


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[ServiceProcess]:
    config = {"rules": [{"id": RULE, "no_baseline": "summarize"}]}
    service = ServiceProcess(tmp_path / "data", config).start()
    try:
        yield service
    finally:
        service.stop()


def _paths(alerts: list[dict[str, Any]]) -> list[str]:
    return [a["fields"]["process.executable.path"] for a in alerts if a.get("kind") is None]


def test_fresh_install_summarises_instead_of_alerting_every_process(svc: ServiceProcess) -> None:
    """The first tick of an empty data dir raises one no_baseline summary for the cluster (the
    suspicious path listed first), not one alert per process; the keys become baseline, so the
    next tick alerts only what is new."""
    t = minute_floor(now_ms())
    first, second = t - 60 * 60_000, t
    export(svc.grpc_port, process_request([*FLEET, IMPLANT], first - 40 * 60_000))
    alerts = svc.evaluate(first)["alerts"]
    assert _paths(alerts) == []
    (summary,) = alerts
    assert summary["kind"] == "no_baseline" and summary["risk_object"] == "prod"
    assert summary["new_keys"] == 13
    assert summary["keys"][0] == {"host": "node-1", "path": IMPLANT.path}
    _, rules = svc.api("GET", "/api/v1/rules")
    parity = next(r for r in rules["rules"] if r["id"] == RULE)
    assert parity["clusters_without_baseline"] == ["prod"]
    assert parity["no_baseline"] == "summarize"

    newcomer = Proc(4242, "/opt/new/agent")
    export(svc.grpc_port, process_request([*FLEET, IMPLANT, newcomer], second - 30 * 60_000))
    assert _paths(svc.evaluate(second)["alerts"]) == [newcomer.path]


def test_history_replayed_first_is_baseline(svc: ServiceProcess) -> None:
    """With history written before the window, the first tick alerts exactly as the reference
    does: the new process, one alert, no summary."""
    t = minute_floor(now_ms())
    export(svc.grpc_port, process_request(FLEET, t - 3 * 3_600_000))
    export(svc.grpc_port, process_request([*FLEET, IMPLANT], t - 5 * 60_000))
    alerts = svc.evaluate(t)["alerts"]
    assert [a.get("kind") for a in alerts] == [None]
    assert _paths(alerts) == [IMPLANT.path]


def test_dry_run_reports_without_recording(svc: ServiceProcess) -> None:
    """evaluate?dry_run=true answers what the tick would report, delivers and records nothing;
    the real tick afterwards reports the same alerts as new."""
    t = minute_floor(now_ms())
    export(svc.grpc_port, process_request(FLEET, t - 3 * 3_600_000))
    export(svc.grpc_port, process_request([IMPLANT], t - 5 * 60_000))
    status, dry = svc.api("POST", f"/api/v1/rules/{RULE}/evaluate?at={iso(t)}&dry_run=true")
    assert status == 200 and dry["dry_run"] is True
    assert _paths(dry["alerts"]) == [IMPLANT.path]
    _, listed = svc.api("GET", f"/api/v1/alerts?since={iso(t - 3_600_000)}")
    assert listed["alerts"] == []
    real = svc.evaluate(t)
    assert real["new"] is True
    assert [a["id"] for a in real["alerts"]] == [a["id"] for a in dry["alerts"]]
    status, now_dry = svc.api("POST", f"/api/v1/rules/{RULE}/evaluate?dry_run=true")
    assert status == 200 and now_dry["tick"] == iso(t + 60_000)
