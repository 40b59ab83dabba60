"""A real Prometheus server scrapes pathwatch's /metrics."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support import Proc, ServiceProcess, export, process_request, wait_until

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus Debian package is installed by .ci/run"
)
def test_prometheus_scrapes_pathwatch(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """Prometheus scrapes /metrics; pathwatch's series come back through Prometheus's own API
    with the values the service counted."""
    svc = service_factory(tmp_path / "data").start()
    export(
        svc.grpc_port,
        process_request(
            [Proc(1, "/bin/a"), Proc(2, "/bin/b")], time.time_ns() // 1_000_000 - 60_000
        ),
    )
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: pathwatch\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{svc.http_port}']\n"
    )
    assert PROMETHEUS is not None
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                result: list[dict[str, Any]] = json.loads(r.read())["data"]["result"]
                return result
        except OSError:
            return []

    try:
        (series,) = wait_until(
            lambda: query('pathwatch_resources_total{outcome="tracked"}'), timeout=30, interval=0.3
        )
        assert series["metric"]["job"] == "pathwatch"
        assert float(series["value"][1]) == 2.0
        up = wait_until(lambda: query('up{job="pathwatch"}'), timeout=10)
        assert up[0]["value"][1] == "1"
        assert query("pathwatch_export_duration_seconds_count")
    finally:
        prom.terminate()
        prom.wait(15)
