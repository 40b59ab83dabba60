"""Beyond the reference: stream mode, presets, learning periods, warm-up, suppression."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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

PARITY = "kubernetes_process_running_from_new_path"
PER_NODE = "kubernetes_process_new_path_per_node"
UNSEEN = "kubernetes_previously_unseen_process"
IN_CLUSTER = "kubernetes_process_new_path_in_cluster"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def paths(alerts: list[dict[str, Any]]) -> list[str]:
    return sorted(a["fields"].get("process.executable.path", "") for a in alerts)


def test_stream_mode_alerts_within_seconds_and_once(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """In stream mode a new key is alerted seconds after its export, through the outbox;
    the scheduled tick for the same window and a repeat export do not alert it again."""
    svc = service_factory(
        tmp_path / "data",
        {"rules": [{"id": PARITY, "mode": "stream"}],
         "sinks": [{"name": "soc", "type": "webhook", "url": sink.url}]},
    ).start()  # fmt: skip
    t = minute_floor(now_ms())
    started = time.monotonic()
    export(svc.grpc_port, process_request([Proc(7, "/tmp/.x/miner")], t - 30_000))
    (got,) = sink.wait_for(1, timeout=10)
    assert time.monotonic() - started < 10
    alert = got.json()
    assert alert["mode"] == "stream"
    assert alert["fields"]["process.executable.path"] == "/tmp/.x/miner"
    export(svc.grpc_port, process_request([Proc(7, "/tmp/.x/miner")], t - 20_000))
    assert svc.evaluate(t)["alerts"] == []  # same occurrence: deduplicated by id
    wait_drained(svc)
    assert len(sink.received) == 1
    assert metric(svc, "pathwatch_alerts_gated_total", rule=PARITY, reason="duplicate") == 1


def test_per_node_preset_ignores_restarts_of_known_binaries(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """A known binary restarting with a new pid is new for the parity rule but not for the
    per-node preset; a new path is new for both; the cluster preset sees a path new to the
    whole cluster once, and the name preset flags a name never seen on the node."""
    overrides = [{"id": r, "enabled": True, "learning_period": "0m"}
                 for r in (PER_NODE, UNSEEN, IN_CLUSTER)]  # fmt: skip
    svc = service_factory(tmp_path / "data", {"rules": overrides}).start()
    t = minute_floor(now_ms())
    export(svc.grpc_port, process_request([Proc(1, "/usr/bin/app", host="n1"),
                                           Proc(5, "/usr/bin/app", host="n2")],
                                          t - 2 * 3_600_000))  # fmt: skip
    now = [Proc(2, "/usr/bin/app", host="n1"), Proc(3, "/tmp/app", host="n1"),
           Proc(4, "/tmp/app", host="n2")]  # fmt: skip
    export(svc.grpc_port, process_request(now, t - 60_000))
    parity = svc.evaluate(t, PARITY)["alerts"]
    assert paths(parity) == ["/tmp/app", "/tmp/app", "/usr/bin/app"]
    per_node = svc.evaluate(t, PER_NODE)["alerts"]
    assert paths(per_node) == ["/tmp/app", "/tmp/app"]
    in_cluster = svc.evaluate(t, IN_CLUSTER)["alerts"]
    assert paths(in_cluster) == ["/tmp/app"]
    assert in_cluster[0]["risk_object"] == "prod"
    assert "never ran before in cluster prod" in in_cluster[0]["risk_message"]
    unseen = svc.evaluate(t, UNSEEN)["alerts"]
    assert unseen == []  # the name "app" was seen on both nodes before


def test_learning_period_and_warmup_gate_alerts(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """A host first seen less than learning_period ago raises no alert (counted); a rule in
    warm-up raises none either; /api/v1/rules says when the baseline is complete."""
    svc = service_factory(
        tmp_path / "data",
        {"rules": [{"id": PER_NODE, "enabled": True},  # preset default: 24 h learning
                   {"id": PARITY, "warmup": "1h"}]},
    ).start()  # fmt: skip
    t = minute_floor(now_ms())
    export(svc.grpc_port, process_request([Proc(1, "/tmp/new")], t - 60_000))
    assert svc.evaluate(t, PER_NODE)["alerts"] == []
    assert metric(svc, "pathwatch_alerts_gated_total", rule=PER_NODE, reason="learning") == 1
    assert svc.evaluate(t, PARITY)["alerts"] == []
    assert metric(svc, "pathwatch_alerts_gated_total", rule=PARITY, reason="warmup") == 1
    _, rules = svc.api("GET", "/api/v1/rules")
    parity = next(r for r in rules["rules"] if r["id"] == PARITY)
    assert parity["baseline"]["complete"] is False
    assert parity["baseline"]["warmup_until"] > parity["baseline"]["first_start"]
    assert metric(svc, "pathwatch_baseline_complete", rule=PARITY) == 0


def test_suppress_for_sends_one_alert_per_host_and_path(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """With suppress_for, a second alert for the same (host, path) within it is counted and
    not sent; another path on the host still alerts."""
    svc = service_factory(
        tmp_path / "data", {"rules": [{"id": PARITY, "suppress_for": "6h"}]}
    ).start()
    t = minute_floor(now_ms())
    first = [Proc(1, "/tmp/a"), Proc(2, "/tmp/a"), Proc(3, "/tmp/b")]
    export(svc.grpc_port, process_request(first, t - 3 * 60_000))
    alerts = svc.evaluate(t - 2 * 60_000)["alerts"]
    assert paths(alerts) == ["/tmp/a", "/tmp/b"]
    export(svc.grpc_port, process_request([Proc(4, "/tmp/a")], t - 90_000))
    assert svc.evaluate(t)["alerts"] == []
    # pid 2 at both ticks and pid 4 at the second; pids 1 and 3 are duplicates of sent alerts
    assert metric(svc, "pathwatch_alerts_gated_total", rule=PARITY, reason="suppressed") == 3
    assert metric(svc, "pathwatch_alerts_gated_total", rule=PARITY, reason="duplicate") == 2


def test_alerts_explain_themselves(tmp_path: Path, service_factory: type[ServiceProcess]) -> None:
    """An alert says where its executable name usually runs, on how many nodes its path and
    name ran before, and when its host was first seen."""
    svc = service_factory(tmp_path / "data").start()
    t = minute_floor(now_ms())
    usual = [Proc(100 + i, "/usr/bin/python3", host=f"node-{i}") for i in range(5)]
    usual.append(Proc(200, "/opt/py/bin/python3", host="node-0"))
    export(svc.grpc_port, process_request(usual, t - 3 * 3_600_000))
    export(svc.grpc_port, process_request([Proc(300, "/tmp/python3", host="node-9")],
                                          t - 4 * 3_600_000))  # fmt: skip
    export(svc.grpc_port, process_request([Proc(301, "/tmp/python3", host="node-9")], t - 60_000))
    (alert,) = svc.evaluate(t)["alerts"]
    ctx = alert["context"]
    assert ctx["name_usual_paths"] == [
        {"path": "/usr/bin/python3", "nodes": 5},
        {"path": "/opt/py/bin/python3", "nodes": 1},
    ]
    assert ctx["name_seen_on_other_nodes"] == 5
    assert ctx["path_seen_on_other_nodes"] == 0
    assert ctx["summary"] == (
        "python3 usually runs from /usr/bin/python3 on 5 node(s); now from /tmp/python3"
    )
    assert ctx["host_first_seen"] is not None


def test_demo_command_prints_the_planted_intrusion() -> None:
    """`pathwatch demo` exits 0 by itself, well under 30 s, printing one alert with context."""
    import json
    import subprocess
    import sys

    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pathwatch", "demo"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 30
    body = out.stdout[out.stdout.index("{") : out.stdout.rindex("}") + 1]
    alert = json.loads(body)
    assert alert["fields"]["process.executable.path"] == "/tmp/.cache/python3"
    assert "usually runs from /usr/bin/python3" in alert["context"]["summary"]
