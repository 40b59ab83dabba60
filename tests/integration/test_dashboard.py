"""The Grafana dashboard (deploy/grafana/pathwatch-dashboard.json, embedded in the Helm chart):
its structure, the metrics and labels its queries name, and every query run against a real
Prometheus scraping the real service."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pathwatch.telemetry.metrics import Metrics
from tests.prometheus_support import PROMETHEUS, Prometheus
from tests.support import (
    ROOT,
    HttpSink,
    Proc,
    ServiceProcess,
    export,
    minute_floor,
    now_ms,
    process_request,
    wait_until,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "pathwatch-dashboard.json"
JOB = "pathwatch"

# Grafana's variables in the queries and what the test puts in their place: the job Prometheus
# scrapes the service as, and windows that hold at least two of its 1 s scrapes.
VARIABLES = {"job": JOB, "__rate_interval": "1m", "__interval": "15s", "__range": "1h"}

# Queries that may return no data here, with the reason: events this test cannot cause cheaply.
# Their metric and label names are still checked against the catalogue (test_queries_name_...).
ALLOWED_EMPTY = {
    ("Backpressure and write errors", "B"): (
        "Export UNAVAILABLE needs the write queue full or every receiver worker busy for the "
        "whole ack_timeout; test_backpressure.py and test_overload.py cause it at length"
    ),
    ("Component failures", "A"): (
        "needs an unexpected exception inside a long-lived component (a bug); "
        "pathwatch_component_failures_total has no series until the first one"
    ),
}

# Queries that return no data because of a gap in the service, not in the test. Each must stay
# empty: once the service is fixed, this test fails and the entry goes.
SERVICE_GAPS: dict[tuple[str, str], str] = {}

# Labels every scraped series has besides its own (Prometheus adds job and instance).
TARGET_LABELS = {"job", "instance"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' collapsed panels included, rows themselves excluded."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(panel title, refId, expr, legendFormat) of every query."""
    for panel in panels(dashboard):
        for target in panel["targets"]:
            yield panel["title"], target["refId"], target["expr"], target.get("legendFormat", "")


def substitute(expr: str) -> str:
    """Grafana's variables ($name, ${name}, ${name:format}, [[name]]) replaced by VARIABLES;
    an unknown variable fails."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in VARIABLES, f"unknown variable {m.group(0)} in {expr}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


def catalogue() -> dict[str, set[str]]:
    """Every series name pathwatch exports -> its labels. A histogram is its _bucket (with
    le), _sum and _count series, never its bare name."""
    names: dict[str, set[str]] = {}
    for spec in Metrics().specs:
        if spec.kind != "histogram":
            names[spec.name] = set(spec.labels)
            continue
        for suffix in HISTOGRAM_SUFFIXES:
            names[spec.name + suffix] = set(spec.labels) | (
                {"le"} if suffix == "_bucket" else set()
            )
    return names


def unknown_names(expr: str) -> list[str]:
    """Metric and label names in `expr` that pathwatch does not export (empty: all known)."""
    known = catalogue()
    problems = []
    metrics = set(re.findall(r"\b(pathwatch_\w+|up)\b(?!\s*\()", expr))
    labels: set[str] = set(TARGET_LABELS)
    for name in metrics:
        if name == "up":
            continue
        if name in known:
            labels |= known[name]
        else:
            problems.append(f"metric {name}")
    used = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        used |= {x.strip() for x in group.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    problems += [f"label {label}" for label in sorted(used - labels)]
    return problems


# -- the file itself ---------------------------------------------------------------------------


def test_dashboard_is_standard_grafana_json() -> None:
    """schemaVersion 39, a stable uid, a Prometheus datasource variable every panel and query
    uses, unique panel ids, unique refIds per panel, a 24-column grid."""
    dashboard = load()
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "pathwatch" and dashboard["title"]
    assert "id" not in dashboard or dashboard["id"] is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in dashboard["panels"]] + [
        p["id"] for r in dashboard["panels"] for p in r.get("panels", [])
    ]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        where = panel["title"]
        assert panel["type"] in ("timeseries", "stat"), where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["description"], where
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            assert target["expr"].strip(), where


def test_dashboard_covers_what_sres_watch() -> None:
    """The issue's list: ingest and rejects, Export latency, write queue and backpressure,
    evaluation and alerts per rule, outbox, delivery failures and dead letters per sink,
    baseline status, RocksDB size and memory, component failures, late data."""
    exprs = " ".join(expr for _, _, expr, _ in targets(load()))
    for name in (
        "pathwatch_export_requests_total",
        "pathwatch_resources_total",
        "pathwatch_resources_untracked_total",
        "pathwatch_data_points_total",
        "pathwatch_export_duration_seconds_bucket",
        "pathwatch_store_pending_keys",
        "pathwatch_receiver_overload_total",
        'outcome="unavailable"',
        "pathwatch_evaluation_duration_seconds_bucket",
        "pathwatch_alerts_total",
        "pathwatch_outbox_depth",
        "pathwatch_deliveries_total",
        "pathwatch_deadletters",
        "pathwatch_baseline_complete",
        "pathwatch_clusters_without_baseline",
        "pathwatch_store_size_bytes",
        "pathwatch_store_memory_bytes",
        "pathwatch_component_failures_total",
        "pathwatch_late_observations_total",
    ):
        assert name in exprs, name


def test_queries_name_only_metrics_and_labels_pathwatch_exports() -> None:
    """Every metric and label a query names is in pathwatch's catalogue (docs/metrics.md), so a
    renamed metric fails here even for the queries allowed to be empty."""
    found = {}
    for title, ref, expr, _ in targets(load()):
        if problems := unknown_names(substitute(expr)):
            found[f"{title} {ref}"] = problems
    assert found == {}


def test_name_check_catches_unknown_names() -> None:
    """The check above is not vacuous."""
    assert unknown_names('sum(rate(pathwatch_export_request_total{job="x"}[1m]))') == [
        "metric pathwatch_export_request_total"
    ]
    assert unknown_names("sum by (sinks) (pathwatch_deadletters)") == ["label sinks"]
    assert unknown_names("pathwatch_export_duration_seconds") == [
        "metric pathwatch_export_duration_seconds"
    ]
    assert (
        unknown_names('sum by (le) (rate(pathwatch_export_duration_seconds_bucket{job="x"}[1m]))')
        == []
    )


def test_exception_lists_name_real_queries() -> None:
    """Every entry of ALLOWED_EMPTY and SERVICE_GAPS is a query of the dashboard."""
    queries = {(title, ref) for title, ref, _, _ in targets(load())}
    assert set(ALLOWED_EMPTY) <= queries
    assert set(SERVICE_GAPS) <= queries


# -- every query against a real Prometheus scraping the real service ---------------------------


def without(attribute: str, request: Any) -> Any:
    """`request` with one resource attribute removed from every resource."""
    for rm in request.resource_metrics:
        kept = [a for a in rm.resource.attributes if a.key != attribute]
        del rm.resource.attributes[:]
        rm.resource.attributes.extend(kept)
    return request


def scraped_value(svc: ServiceProcess, name: str, **labels: str) -> float:
    """A sample of /metrics as Prometheus scrapes it (no API call that could set a gauge)."""
    _, text = svc.api("GET", "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return 0.0


def admin_read_timeout(port: int) -> bytes:
    """A request that never finishes: the admin server answers 408 after http.read_timeout
    and counts it (pathwatch_receiver_overload_total{receiver="admin"})."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        return s.recv(64)


@pytest.mark.integration
@pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus Debian package is installed by .ci/run"
)
def test_every_panel_query_is_valid_and_returns_data(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """Traffic that exercises ingest, rejects, late data, evaluations (alerts, gated, summarised,
    a cluster without baseline) and three webhook sinks (one retried, one dead-lettering, one
    disabled by 410); once Prometheus scraped twice after it, every query of every panel is
    valid and returns data, except the documented ALLOWED_EMPTY and SERVICE_GAPS; every
    {{label}} of a legend is a label of the series it names."""
    retry = {"initial_backoff": "50ms", "max_backoff": "200ms"}
    soc, broken, gone = HttpSink(), HttpSink(default=400), HttpSink(default=410)
    soc.script = [500]  # the first attempt is retried
    sinks = {"soc": soc, "broken": broken, "gone": gone}
    try:
        svc = service_factory(
            tmp_path / "data",
            {
                "http": {"listen": "127.0.0.1:0", "read_timeout": "500ms"},
                "limits": {"max_alerts_per_tick": 2},
                "rules": [
                    {"id": "kubernetes_process_new_path_per_node", "enabled": True, "warmup": "1h"},
                    {
                        "id": "kubernetes_process_new_path_in_cluster",
                        "enabled": True,
                        "no_baseline": "summarize",
                    },
                ],
                "sinks": [
                    {"name": name, "type": "webhook", "url": s.url, "retry": retry}
                    for name, s in sinks.items()
                ],
            },
        ).start()
        with Prometheus(tmp_path / "prometheus", {JOB: f"127.0.0.1:{svc.http_port}"}) as prom:
            t = minute_floor(now_ms())
            procs = [Proc(1, "/bin/a"), Proc(2, "/tmp/x"), Proc(3, "/tmp/y")]
            export(svc.grpc_port, process_request(procs, t - 60_000))
            future = export(
                svc.grpc_port, process_request([Proc(4, "/bin/f")], now_ms() + 3_600_000)
            )
            assert future.partial_success.rejected_data_points == 4
            export(
                svc.grpc_port,
                without("k8s.cluster.name", process_request([Proc(5, "/bin/n")], t - 60_000)),
            )
            # Three keys past limits.max_alerts_per_tick (2): recorded, plus one summary.
            assert len(svc.evaluate(t)["alerts"]) == 4
            assert svc.evaluate(t, "kubernetes_process_new_path_per_node")["alerts"] == []
            # A fresh cluster: one no_baseline summary instead of an alert per key.
            assert len(svc.evaluate(t, "kubernetes_process_new_path_in_cluster")["alerts"]) == 1
            # A new minute of a key inside a tick that already ran: late, after_tick.
            export(svc.grpc_port, process_request([Proc(6, "/bin/late")], t - 30 * 60_000))
            assert admin_read_timeout(svc.http_port).startswith(b"HTTP/1.1 408")
            soc.wait_for(2)
            wait_until(lambda: scraped_value(svc, "pathwatch_deadletters", sink="broken") > 0, 20)
            wait_until(lambda: scraped_value(svc, "pathwatch_sink_disabled", sink="gone") == 1, 20)
            wait_until(
                lambda: (
                    scraped_value(svc, "pathwatch_late_observations_total", outcome="after_tick")
                    > 0
                ),
                20,
            )
            at = prom.wait_for_scrapes(JOB, count=2, after=time.time())

            assert prom.query("pathwatch_no_such_metric_total", at) == []  # empty is detectable
            invalid, empty, bad_legend = {}, set(), {}
            for title, ref, expr, legend in targets(load()):
                answer = prom.api(substitute(expr), at)
                if answer["status"] != "success":
                    invalid[(title, ref)] = answer.get("error")
                    continue
                result = answer["data"]["result"]
                if not result:
                    empty.add((title, ref))
                for series in result:
                    missing = (
                        set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)) - series["metric"].keys()
                    )
                    if missing:
                        bad_legend[(title, ref)] = sorted(missing)
    finally:
        for s in sinks.values():
            s.close()
    assert invalid == {}
    assert bad_legend == {}
    assert empty - ALLOWED_EMPTY.keys() - SERVICE_GAPS.keys() == set(), "queries without data"
    fixed = SERVICE_GAPS.keys() - empty
    assert not fixed, f"these return data now: remove them from SERVICE_GAPS: {fixed}"
