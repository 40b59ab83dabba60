"""The whole pipeline through the real service: OTLP/gRPC in, RocksDB, evaluate, webhook out."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms

from tests.support import (
    FIXTURES,
    HttpSink,
    Proc,
    ServiceProcess,
    export,
    fixture_request,
    iso,
    minute_floor,
    process_request,
    wait_drained,
)

pytestmark = pytest.mark.integration


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_new_process_alerts_once_through_webhook(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """A process first seen in the last hour yields one risk event, delivered to the webhook;
    evaluating the same tick again returns the same alert and delivers nothing new."""
    svc = service_factory(
        tmp_path / "data", {"sinks": [{"name": "soc", "type": "webhook", "url": sink.url}]}
    ).start()
    t = minute_floor(now_ms())
    resp = export(svc.grpc_port, process_request([Proc(4242, "/tmp/xmrig")], t - 10 * 60_000))
    assert resp.partial_success.rejected_data_points == 0

    result = svc.evaluate(t)
    assert result["new"] is True
    (alert,) = result["alerts"]
    assert alert["fields"]["process.executable.path"] == "/tmp/xmrig"
    assert alert["fields"]["host"] == "node-1"
    assert alert["risk_object"] == "node-1"
    assert alert["risk_score"] == 25
    assert alert["risk_message"] == "Kubernetes Process Running From New Path on host node-1"
    assert alert["annotations"]["mitre_attack"]["mitre_technique_id"] == ["T1204"]
    assert alert["rule"]["search_name"] == "ESCU - Kubernetes Process Running From New Path - Rule"
    assert alert["window"] == {"start": iso(t - 3_600_000), "end": iso(t)}

    (delivered,) = sink.wait_for(1)
    assert delivered.json() == alert
    assert delivered.headers["webhook-id"] == alert["id"]
    assert delivered.headers["content-type"] == "application/json"
    assert delivered.headers["user-agent"].startswith("pathwatch/")  # not Python-urllib

    again = svc.evaluate(t)
    assert again == {"alerts": [alert], "new": False}
    wait_drained(svc)
    assert len(sink.received) == 1

    status, listed = svc.api("GET", f"/api/v1/alerts?since={iso(t - 60_000)}")
    assert status == 200 and [a["id"] for a in listed["alerts"]] == [alert["id"]]
    status, rules = svc.api("GET", "/api/v1/rules")
    assert rules["rules"][0]["last_tick"]["time"] == iso(t)


def test_known_process_does_not_alert(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """A key observed in the baseline (here two hours ago) and again now is not new."""
    svc = service_factory(tmp_path / "data").start()
    t = minute_floor(now_ms())
    proc = Proc(1, "/usr/bin/containerd")
    export(svc.grpc_port, process_request([proc], t - 2 * 3_600_000))
    export(svc.grpc_port, process_request([proc, Proc(2, "/tmp/new")], t - 5 * 60_000))
    alerts = svc.evaluate(t)["alerts"]
    assert [a["fields"]["process.executable.path"] for a in alerts] == ["/tmp/new"]


def test_real_collector_output_is_detected(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """The hostmetrics scraper's golden output (with host attributes added, as the resource
    processor does) produces one alert per process, including the bare-word path `sleep`."""
    svc = service_factory(tmp_path / "data").start()
    t = minute_floor(now_ms())
    resp = export(svc.grpc_port, fixture_request(t - 60_000))
    assert resp.partial_success.rejected_data_points == 0
    alerts = svc.evaluate(t)["alerts"]
    paths = sorted(a["fields"]["process.executable.path"] for a in alerts)
    assert len(paths) == 2 and "/bin/sleep" in paths


def test_fixture_without_host_attributes_is_not_tracked(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """Resources missing a key field are not tracked, counted by reason in a metric, and their
    points are reported rejected through partial_success with the missing field named."""
    import yaml

    svc = service_factory(tmp_path / "data").start()
    data = yaml.safe_load((FIXTURES / "otelcol-contrib" / "expected_process.yaml").read_text())
    req = ms.ExportMetricsServiceRequest()
    json_format.ParseDict(data, req)
    t = (minute_floor(now_ms()) - 60_000) * 1_000_000
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for dp in getattr(m, m.WhichOneof("data")).data_points:
                    dp.time_unix_nano = t
    resp = export(svc.grpc_port, req)
    assert resp.partial_success.rejected_data_points > 0
    assert "without key field host.name" in resp.partial_success.error_message
    _, text = svc.api("GET", "/metrics")
    assert 'pathwatch_resources_total{outcome="untracked"} 2.0' in text
    assert 'pathwatch_resources_untracked_total{reason="missing_field"} 2.0' in text


def test_non_process_metrics_are_accepted_and_ignored(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """The OTLP specification's example metrics are accepted with no rejection and no key."""
    svc = service_factory(tmp_path / "data").start()
    req = ms.ExportMetricsServiceRequest()
    json_format.ParseDict(
        json.loads((FIXTURES / "otlp-examples" / "metrics.json").read_text()), req
    )
    resp = export(svc.grpc_port, req)
    assert resp.partial_success.rejected_data_points == 0
    assert svc.evaluate(minute_floor(now_ms()))["alerts"] == []
    _, text = svc.api("GET", "/metrics")
    assert 'pathwatch_resources_total{outcome="ignored"} 1.0' in text


def test_memory_gauges_show_caches_and_rocksdb_parts(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """SREs see what holds memory: RocksDB's parts and the entries of each bounded cache."""
    svc = service_factory(tmp_path / "data").start()
    export(svc.grpc_port, process_request([Proc(1, "/a"), Proc(2, "/b")], now_ms() - 60_000))
    _, text = svc.api("GET", "/metrics")
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("pathwatch_cache_entries", "pathwatch_store_memory_bytes"))
    }
    assert values['pathwatch_cache_entries{cache="keys"}'] == 2
    assert values['pathwatch_cache_entries{cache="resources"}'] == 2
    assert values['pathwatch_cache_entries{cache="durable"}'] == 2
    assert values['pathwatch_store_memory_bytes{part="memtables"}'] > 0
    assert 'pathwatch_store_memory_bytes{part="block_cache"}' in values
    assert 'pathwatch_store_memory_bytes{part="table_readers"}' in values


def test_out_of_range_points_are_rejected_through_partial_success(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """Points older than baseline + window + 1 day or over 5 minutes ahead are rejected and
    reported in partial_success; the rest of the request is kept."""
    svc = service_factory(tmp_path / "data").start()
    t = minute_floor(now_ms())
    req = process_request([Proc(1, "/ok")], t - 60_000)
    req.MergeFrom(process_request([Proc(2, "/too-old")], t - 32 * 86_400_000))
    req.MergeFrom(process_request([Proc(3, "/future")], t + 3_600_000))
    resp = export(svc.grpc_port, req)
    assert resp.partial_success.rejected_data_points == 8  # 4 points per process
    assert "older than the retention horizon" in resp.partial_success.error_message
    assert "future" in resp.partial_success.error_message
    paths = [a["fields"]["process.executable.path"] for a in svc.evaluate(t)["alerts"]]
    assert paths == ["/ok"]


def test_garbage_request_is_invalid_argument(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """Bytes that are not an Export request get INVALID_ARGUMENT (permanent), not a crash."""
    svc = service_factory(tmp_path / "data").start()
    with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as ch:
        call = ch.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff\xff garbage", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status, _ = svc.api("GET", "/readyz")
    assert status == 200


def test_grpc_health_service_reports_serving(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """The standard gRPC health service answers SERVING for the metrics service."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    svc = service_factory(tmp_path / "data").start()
    with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        resp = stub.Check(
            health_pb2.HealthCheckRequest(
                service="opentelemetry.proto.collector.metrics.v1.MetricsService"
            ),
            timeout=5,
        )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_state_survives_kill_9(tmp_path: Path, service_factory: type[ServiceProcess]) -> None:
    """Every acknowledged export is in the store after kill -9 and a restart."""
    data = tmp_path / "data"
    svc = service_factory(data).start()
    t = minute_floor(now_ms())
    procs = [Proc(100 + i, f"/opt/app/bin{i}") for i in range(50)]
    export(svc.grpc_port, process_request(procs, t - 20 * 60_000))
    svc.kill()
    svc2 = service_factory(data).start()
    alerts = svc2.evaluate(t)["alerts"]
    assert len(alerts) == 50


def test_cli_evaluate_and_inspect_on_stopped_data_dir(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """`pathwatch evaluate` prints risk events as JSON lines; `inspect --path` finds the key."""
    data = tmp_path / "data"
    svc = service_factory(data).start()
    t = minute_floor(now_ms())
    export(svc.grpc_port, process_request([Proc(7, "/tmp/dropper")], t - 60_000))
    assert svc.stop() == 0
    run = [sys.executable, "-m", "pathwatch"]
    out = subprocess.run(
        [*run, "evaluate", "--data-dir", str(data), "--at", iso(t)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (line,) = out.stdout.splitlines()
    assert json.loads(line)["fields"]["process.executable.path"] == "/tmp/dropper"
    out = subprocess.run(
        [*run, "inspect", "--data-dir", str(data), "--path", "/tmp/*"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = json.loads(out.stdout.splitlines()[0])
    assert found["key"]["process.pid"] == "7"
    assert found["first_seen"] == iso(t - 60_000)


def test_data_dir_in_use_is_reported(tmp_path: Path, service_factory: type[ServiceProcess]) -> None:
    """A second process on a data dir in use exits non-zero and says why."""
    data = tmp_path / "data"
    service_factory(data).start()
    out = subprocess.run(
        [sys.executable, "-m", "pathwatch", "evaluate", "--data-dir", str(data), "--at", iso(0)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "in use" in out.stderr


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    """`check-config` and `serve` exit 2 and name the field and the problem."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("rules:\n  - id: kubernetes_process_running_from_new_path\n    window: soon\n")
    for cmd in ("check-config", "serve"):
        out = subprocess.run(
            [sys.executable, "-m", "pathwatch", cmd, "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2
        assert "rules[0].window" in out.stderr and "duration" in out.stderr


def test_sigterm_shuts_down_cleanly(tmp_path: Path, service_factory: type[ServiceProcess]) -> None:
    """SIGTERM stops the service with exit code 0 within the bounded shutdown time."""
    svc = service_factory(tmp_path / "data").start()
    export(svc.grpc_port, process_request([Proc(1, "/bin/sh")], now_ms() - 60_000))
    started = time.monotonic()
    assert svc.stop(timeout=30) == 0
    assert time.monotonic() - started < 25
    assert any("pathwatch stopped" in line for line in svc.lines)
