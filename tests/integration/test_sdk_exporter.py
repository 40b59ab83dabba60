"""The OpenTelemetry Python SDK's own OTLP/gRPC exporter talks to pathwatch unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.exporter import Compression
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tests.support import ServiceProcess

pytestmark = pytest.mark.integration


def test_sdk_exporter_feeds_detection(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """Process metrics exported by the SDK (gzip, int pid) become a risk event."""
    svc = service_factory(tmp_path / "data").start()
    resource = Resource.create(
        {
            "host.name": "node-7",
            "k8s.cluster.name": "prod",
            "k8s.node.name": "node-7",
            "process.pid": 31337,
            "process.executable.path": "/dev/shm/.x/kworker",
            "process.executable.name": "kworker",
        }
    )
    exporter = OTLPMetricExporter(
        endpoint=f"127.0.0.1:{svc.grpc_port}",
        insecure=True,
        compression=Compression.Gzip,
        timeout=10,
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    meter = provider.get_meter("pathwatch-test")

    def memory(_: CallbackOptions) -> list[Observation]:
        return [Observation(1 << 20)]

    meter.create_observable_gauge("process.memory.usage", callbacks=[memory], unit="By")
    meter.create_counter("process.context_switches").add(3)
    assert provider.force_flush(10_000)
    provider.shutdown()

    status, body = svc.api("GET", "/api/v1/keys?path=/dev/shm/*")
    assert status == 200
    (key,) = body["keys"]
    assert key["key"]["process.pid"] == "31337"
    assert key["key"]["host.name"] == "node-7"
    # Evaluation of a stored key is covered by the engine and end-to-end tests; what this test
    # pins is that the SDK's encoding (int pid, gzip, its own timestamps) is read and tracked.
    assert key["first_seen"] <= key["last_seen"]
