"""A real OpenTelemetry collector (rotel) between OTLP senders and pathwatch."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tests.support import Proc, ServiceProcess, export, minute_floor, process_request, wait_until

pytestmark = pytest.mark.integration

rotel = pytest.importorskip("rotel")
ROTEL_AGENT = Path(rotel.__file__).parent / "rotel-agent"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_detection_through_rotel_collector(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """The SDK and a raw client export to rotel; rotel exports OTLP/gRPC (gzip) to pathwatch;
    the raw client's process becomes a risk event and the SDK's process is tracked."""
    svc = service_factory(tmp_path / "data").start()
    grpc_in, http_in = free_port(), free_port()
    log = tmp_path / "rotel.log"
    proc = subprocess.Popen(
        [
            str(ROTEL_AGENT), "start",
            "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_in}",
            "--otlp-http-endpoint", f"127.0.0.1:{http_in}",
            "--exporter", "otlp",
            "--otlp-exporter-endpoint", f"http://127.0.0.1:{svc.grpc_port}",
            "--otlp-exporter-protocol", "grpc",
            "--otlp-exporter-compression", "gzip",
            "--pid-file", str(tmp_path / "rotel.pid"),
            "--log-file", str(log),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "info"},
    )  # fmt: skip
    try:

        def rotel_ready() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", grpc_in), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(rotel_ready, timeout=20, interval=0.1)
        t = minute_floor(time.time_ns() // 1_000_000)
        for attempt in range(20):
            try:
                export(grpc_in, process_request([Proc(666, "/var/tmp/implant")], t - 60_000))
                break
            except grpc.RpcError:
                time.sleep(0.2 * (attempt + 1))

        provider = MeterProvider(
            resource=Resource.create(
                {
                    "host.name": "node-2",
                    "k8s.cluster.name": "prod",
                    "k8s.node.name": "node-2",
                    "process.pid": 4040,
                    "process.executable.path": "/usr/bin/sdk-proc",
                    "process.executable.name": "sdk-proc",
                }
            ),
            metric_readers=[
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=f"127.0.0.1:{grpc_in}", insecure=True),
                    export_interval_millis=3_600_000,
                )
            ],
        )

        def cpu(_: CallbackOptions) -> list[Observation]:
            return [Observation(0.25)]

        provider.get_meter("test").create_observable_counter("process.cpu.time", callbacks=[cpu])
        assert provider.force_flush(10_000)
        provider.shutdown()

        def alerts() -> list[dict[str, object]]:
            # Evaluating records the tick; rotel batches, so wait for the data before asking.
            _status, keys = svc.api("GET", "/api/v1/keys?path=/var/tmp/*")
            if not keys["keys"]:
                return []
            result: list[dict[str, object]] = svc.evaluate(t)["alerts"]
            return result

        (alert,) = wait_until(alerts, timeout=30, interval=0.3)
        assert alert["risk_object"] == "node-1"
        _status, body = wait_until(
            lambda: (r := svc.api("GET", "/api/v1/keys?path=/usr/bin/sdk-proc"))[1]["keys"] and r,
            timeout=30, interval=0.3,
        )  # fmt: skip
        assert body["keys"][0]["key"]["process.pid"] == "4040"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
