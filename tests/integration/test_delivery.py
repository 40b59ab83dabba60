"""Durable delivery against real local HTTP servers that fail, stall, throttle and recover."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from tests.support import (
    HttpSink,
    Proc,
    ServiceProcess,
    export,
    minute_floor,
    process_request,
    wait_drained,
    wait_until,
)

pytestmark = pytest.mark.integration

FAST_RETRY = {"initial_backoff": "50ms", "max_backoff": "200ms"}
SECRET_A = "whsec_" + base64.b64encode(b"first secret for pathwatch tests").decode()
SECRET_B = "whsec_" + base64.b64encode(b"second secret, rotated in").decode()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def produce_alerts(svc: ServiceProcess, count: int = 1) -> list[dict[str, Any]]:
    t = minute_floor(now_ms())
    procs = [Proc(1000 + i, f"/tmp/payload-{i}") for i in range(count)]
    export(svc.grpc_port, process_request(procs, t - 60_000))
    alerts: list[dict[str, Any]] = svc.evaluate(t)["alerts"]
    assert len(alerts) == count
    return alerts


def webhook(sink: HttpSink, **extra: Any) -> dict[str, Any]:
    return {"name": "soc", "type": "webhook", "url": sink.url, "retry": FAST_RETRY, **extra}


def metric(svc: ServiceProcess, name: str, **labels: str) -> float:
    _, text = svc.api("GET", "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return 0.0


def test_signed_webhook_verifies_with_every_rotated_secret(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess], monkeypatch: Any
) -> None:
    """Standard Webhooks signatures verify with the independent `standardwebhooks` package,
    for each secret configured during a rotation (inline and from a file)."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET_B + "\n")
    svc = service_factory(
        tmp_path / "data",
        {"sinks": [webhook(sink, secret=SECRET_A, secret_file=str(secret_file))]},
    ).start()
    (alert,) = produce_alerts(svc)
    (got,) = sink.wait_for(1)
    headers = {k: v for k, v in got.headers.items() if k.startswith("webhook-")}
    assert headers["webhook-id"] == alert["id"]
    for secret in (SECRET_A, SECRET_B):
        assert Webhook(secret).verify(got.body, headers) == alert
    with pytest.raises(Exception, match=r"(?i)signature"):
        Webhook("whsec_" + base64.b64encode(b"some other secret").decode()).verify(
            got.body, headers
        )


def test_retries_until_sink_recovers_with_same_id(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """5xx, 408 and a timeout are retried; the alert arrives once the sink recovers, with the
    same webhook-id on every attempt."""
    sink.script = [503, 408, ("sleep", 1.5), 500]
    svc = service_factory(tmp_path / "data", {"sinks": [webhook(sink, timeout="500ms")]}).start()
    (alert,) = produce_alerts(svc)
    got = sink.wait_for(5)
    assert {r.headers["webhook-id"] for r in got} == {alert["id"]}
    wait_until(lambda: metric(svc, "pathwatch_deliveries_total", sink="soc", outcome="delivered"))
    assert metric(svc, "pathwatch_deliveries_total", sink="soc", outcome="retried") == 4
    assert metric(svc, "pathwatch_outbox_depth", sink="soc") == 0


def test_429_retry_after_is_honoured(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """A 429 with Retry-After: 2 delays the next attempt by at least two seconds, although the
    configured backoff is 50-200 ms."""
    sink.script = [(429, {"Retry-After": "2"})]
    svc = service_factory(tmp_path / "data", {"sinks": [webhook(sink)]}).start()
    produce_alerts(svc)
    sink.wait_for(1)
    first = time.monotonic()
    sink.wait_for(2, timeout=10)
    assert time.monotonic() - first >= 1.9


def test_permanent_failure_dead_letters_and_redrive_delivers(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """A 400 is not retried: the alert becomes a dead letter, listed by the API with the
    attempt that failed and the sink's answer, and is delivered after a redrive."""
    sink.script = [400]
    svc = service_factory(tmp_path / "data", {"sinks": [webhook(sink)]}).start()
    (alert,) = produce_alerts(svc)
    sink.wait_for(1)
    status, body = wait_until(
        lambda: (r := svc.api("GET", "/api/v1/deadletters"))[1]["deadletters"] and r
    )
    (dead,) = body["deadletters"]
    assert dead["alert_id"] == alert["id"] and "HTTP 400" in dead["reason"]
    assert dead["attempts"] == 1  # the one attempt that failed, not 0
    assert metric(svc, "pathwatch_deliveries_total", sink="soc", outcome="dead_lettered") == 1
    status, body = svc.api("POST", "/api/v1/deadletters/redrive?sink=soc")
    assert (status, body) == (200, {"redriven": 1})
    got = sink.wait_for(2)
    assert got[1].headers["webhook-id"] == alert["id"]
    assert svc.api("GET", "/api/v1/deadletters")[1]["deadletters"] == []


def test_max_age_dead_letters(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """An alert still undelivered after retry.max_age is dead-lettered with the last error."""
    sink.default = 503
    svc = service_factory(
        tmp_path / "data",
        {"sinks": [webhook(sink, retry={**FAST_RETRY, "max_age": "1s"})]},
    ).start()
    produce_alerts(svc)
    _, body = wait_until(
        lambda: (r := svc.api("GET", "/api/v1/deadletters"))[1]["deadletters"] and r, timeout=15
    )
    assert "HTTP 503" in body["deadletters"][0]["reason"]


def test_410_gone_disables_sink_and_keeps_alerts(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """410 Gone disables the sink (readyz detail, metric), sends nothing more, keeps the
    records; after a restart with the endpoint back the alert is delivered."""
    data = tmp_path / "data"
    sink.script = [410]
    svc = service_factory(data, {"sinks": [webhook(sink)]}).start()
    (alert,) = produce_alerts(svc)
    sink.wait_for(1)
    wait_until(lambda: metric(svc, "pathwatch_sink_disabled", sink="soc") == 1)
    _, ready = svc.api("GET", "/readyz")
    assert "disabled" in ready["checks"]["sink:soc"]
    time.sleep(0.5)
    assert len(sink.received) == 1
    assert metric(svc, "pathwatch_outbox_depth", sink="soc") == 1
    svc.stop()
    service_factory(data, {"sinks": [webhook(sink)]}).start()
    got = sink.wait_for(2)
    assert got[1].headers["webhook-id"] == alert["id"]


def test_kill_9_with_pending_deliveries_loses_nothing(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """kill -9 while the sink is down: after restart every alert arrives with its webhook-id."""
    data = tmp_path / "data"
    sink.default = 503
    svc = service_factory(data, {"sinks": [webhook(sink)]}).start()
    alerts = produce_alerts(svc, count=5)
    sink.wait_for(5)
    svc.kill()
    sink.default = 200
    before = len(sink.received)
    service_factory(data, {"sinks": [webhook(sink)]}).start()
    wait_until(
        lambda: (
            {r.headers["webhook-id"] for r in sink.received[before:]} >= {a["id"] for a in alerts}
        ),
        timeout=20,
    )


def test_filters_by_score_and_rule(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """A sink with min_risk_score above 25, or for other rules only, receives nothing."""
    other = HttpSink()
    try:
        svc = service_factory(
            tmp_path / "data",
            {
                "sinks": [
                    webhook(sink, name="high", min_risk_score=50),
                    webhook(other, name="others", rules=["some_other_rule"]),
                    {"name": "all", "type": "webhook", "url": other.url + "/all"},
                ]
            },
        ).start()
        produce_alerts(svc)
        (got,) = other.wait_for(1)
        assert got.path == "/all"
        wait_drained(svc)
        assert sink.received == [] and len(other.received) == 1
    finally:
        other.close()


def test_splunk_hec_batches_with_envelope(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """HEC gets `Authorization: Splunk <token>` and several envelopes per request, each with
    time, host, source = the search name, sourcetype, index and the event."""
    svc = service_factory(
        tmp_path / "data",
        {
            "sinks": [
                {
                    "name": "hec",
                    "type": "splunk_hec",
                    "url": sink.url,
                    "token_env": "HEC_TOKEN",
                    "batch_size": 10,
                }
            ]
        },
        env={"HEC_TOKEN": "11111111-2222-3333-4444-555555555555"},
    ).start()
    alerts = produce_alerts(svc, count=3)
    (got,) = sink.wait_for(1)
    assert got.path == "/services/collector/event"
    assert got.headers["authorization"] == "Splunk 11111111-2222-3333-4444-555555555555"
    import json

    envelopes = [json.loads(line) for line in got.body.decode().splitlines()]
    assert [e["event"]["id"] for e in envelopes] == [a["id"] for a in alerts]
    first = envelopes[0]
    assert first["sourcetype"] == "pathwatch:risk" and first["index"] == "risk"
    assert first["source"] == "ESCU - Kubernetes Process Running From New Path - Rule"
    assert first["host"] == "node-1"
    assert isinstance(first["time"], float)


def test_cloudevents_structured_mode(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """CloudEvents 1.0 structured JSON with the alert id, subject = host, data = the event."""
    svc = service_factory(
        tmp_path / "data",
        {
            "sinks": [
                {"name": "ce", "type": "cloudevents", "url": sink.url, "source": "/pathwatch/prod"}
            ]
        },
    ).start()
    (alert,) = produce_alerts(svc)
    (got,) = sink.wait_for(1)
    assert got.headers["content-type"].startswith("application/cloudevents+json")
    ce = got.json()
    assert ce["specversion"] == "1.0" and ce["type"] == "io.pathwatch.risk.v1"
    assert ce["id"] == alert["id"] and ce["subject"] == "node-1"
    assert ce["source"] == "/pathwatch/prod" and ce["time"] == alert["time"]
    assert ce["data"] == alert


ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


@pytest.mark.skipif(ALERTMANAGER is None, reason="prometheus-alertmanager is installed by .ci/run")
def test_real_alertmanager_lists_the_alert(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """A real Alertmanager accepts the alerts and lists them in its own API with our labels."""
    import json
    import socket
    import urllib.request

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    port, cluster_port = free_port(), free_port()
    cfg = tmp_path / "am.yml"
    cfg.write_text("route:\n  receiver: none\nreceivers:\n  - name: none\n")
    assert ALERTMANAGER is not None
    am = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={cfg}",
            f"--storage.path={tmp_path / 'am'}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--cluster.listen-address=127.0.0.1:{cluster_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def am_ready() -> bool:
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(am_ready, timeout=30, interval=0.2)
        svc = service_factory(
            tmp_path / "data",
            {
                "sinks": [
                    {
                        "name": "am",
                        "type": "alertmanager",
                        "url": base,
                        "generator_url": "http://pathwatch.example/alerts",
                    }
                ]
            },
        ).start()
        (alert,) = produce_alerts(svc)

        def listed() -> list[dict[str, Any]]:
            with urllib.request.urlopen(base + "/api/v2/alerts", timeout=5) as r:
                data: list[dict[str, Any]] = json.loads(r.read())
                return data

        (got,) = wait_until(listed, timeout=20, interval=0.2)
        labels = got["labels"]
        assert labels["alertname"] == "KubernetesProcessRunningFromNewPath"
        assert labels["rule"] == "kubernetes_process_running_from_new_path"
        assert labels["host"] == "node-1" and labels["k8s_cluster"] == "prod"
        assert labels["k8s_node"] == "node-1" and labels["severity"] == "warning"
        ann = got["annotations"]
        assert ann["executable_path"] == "/tmp/payload-0" and ann["risk_score"] == "25"
        assert ann["risk_message"] == alert["risk_message"]
        assert got["generatorURL"] == "http://pathwatch.example/alerts"
    finally:
        am.terminate()
        am.wait(10)


def test_cli_redrive_on_a_stopped_data_dir(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """`pathwatch redrive` moves dead letters back to the outbox of a stopped data dir; the
    next start delivers them."""
    import sys

    data = tmp_path / "data"
    sink.script = [403]
    svc = service_factory(data, {"sinks": [webhook(sink)]}).start()
    (alert,) = produce_alerts(svc)
    wait_until(lambda: svc.api("GET", "/api/v1/deadletters")[1]["deadletters"])
    assert svc.stop() == 0
    cfg = data.parent / f"{data.name}-config.yaml"
    out = subprocess.run([sys.executable, "-m", "pathwatch", "redrive", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 dead letter(s) moved back")
    service_factory(data, {"sinks": [webhook(sink)]}).start()
    got = sink.wait_for(2)
    assert got[1].headers["webhook-id"] == alert["id"]


def test_full_outbox_dead_letters_and_reports(
    tmp_path: Path, sink: HttpSink, service_factory: type[ServiceProcess]
) -> None:
    """A sink's outbox holds at most max_queue alerts; past it, alerts go straight to the
    dead letters with the reason, counted in pathwatch_outbox_full_total; nothing is lost."""
    sink.default = 503
    svc = service_factory(tmp_path / "data", {"sinks": [webhook(sink, max_queue=2)]}).start()
    alerts = produce_alerts(svc, count=5)
    _, body = svc.api("GET", "/api/v1/deadletters")
    assert len(body["deadletters"]) == 3
    assert {d["reason"] for d in body["deadletters"]} == {"outbox full"}
    assert metric(svc, "pathwatch_outbox_full_total", sink="soc") == 3
    wait_until(lambda: metric(svc, "pathwatch_outbox_depth", sink="soc") == 2)
    kept = {d["alert_id"] for d in body["deadletters"]}
    sink.default = 200
    svc.api("POST", "/api/v1/deadletters/redrive")
    wait_until(lambda: {r.headers["webhook-id"] for r in sink.received if r.headers}
               >= {a["id"] for a in alerts} and not svc.api("GET", "/api/v1/deadletters")[1]
               ["deadletters"], timeout=20)  # fmt: skip
    assert kept < {a["id"] for a in alerts}
