"""Export requests shaped like the collector's hostmetrics process scraper, and the key tuple
pathwatch's parity rule derives from each resource (what the model records when acknowledged).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2

EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
SCOPE = "github.com/open-telemetry/opentelemetry-collector-contrib/receiver/hostmetricsreceiver"

# The parity rule's key, in its key_fields order: host.name, k8s.cluster.name, k8s.node.name,
# process.pid, process.executable.path, process.executable.name (all as text).
Key = tuple[str, str, str, str, str, str]


@dataclass(frozen=True, slots=True)
class Process:
    """One process on one host, as the scraper reports it."""

    host: str
    cluster: str
    pid: int
    path: str  # empty for kernel threads: such a resource is not tracked
    name: str
    started_ms: int

    @property
    def key(self) -> Key | None:
        """The parity rule's key, or None when a key field is empty (pathwatch skips it)."""
        if not (self.host and self.cluster and self.path and self.name):
            return None
        return (self.host, self.cluster, self.host, str(self.pid), self.path, self.name)


def _attr(key: str, value: str | int) -> common_pb2.KeyValue:
    if isinstance(value, int):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def scrape_request(
    scrapes: Iterable[tuple[int, Iterable[Process]]],
) -> ms.ExportMetricsServiceRequest:
    """One request holding, per (time in ms, processes), a ResourceMetrics per process with
    the scraper's default metrics, every data point stamped with that time."""
    req = ms.ExportMetricsServiceRequest()
    for time_ms, procs in scrapes:
        t = time_ms * 1_000_000
        for p in procs:
            rm = req.resource_metrics.add()
            rm.resource.attributes.extend(
                [
                    _attr("process.pid", p.pid),
                    _attr("process.parent_pid", 1),
                    _attr("process.executable.name", p.name),
                    _attr("process.executable.path", p.path),
                    _attr("process.command", p.path or p.name),
                    _attr("process.command_line", f"{p.path or p.name} --serve"),
                    _attr("process.owner", "root"),
                    _attr("host.name", p.host),
                    _attr("k8s.cluster.name", p.cluster),
                    _attr("k8s.node.name", p.host),
                ]
            )
            sm = rm.scope_metrics.add()
            sm.scope.name = SCOPE
            start = min(p.started_ms, time_ms) * 1_000_000
            cpu = sm.metrics.add(name="process.cpu.time", unit="s")
            cpu.sum.is_monotonic = True
            cpu.sum.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
            for state in ("user", "system", "wait"):
                dp = cpu.sum.data_points.add(time_unix_nano=t, start_time_unix_nano=start)
                dp.as_double = 0.25
                dp.attributes.append(_attr("state", state))
            for name in ("process.memory.usage", "process.memory.virtual"):
                mem = sm.metrics.add(name=name, unit="By")
                mem.sum.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
                mem.sum.data_points.add(
                    time_unix_nano=t, start_time_unix_nano=start, as_int=1 << 22
                )
            io = sm.metrics.add(name="process.disk.io", unit="By")
            io.sum.is_monotonic = True
            io.sum.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
            for direction in ("read", "write"):
                dp = io.sum.data_points.add(time_unix_nano=t, start_time_unix_nano=start)
                dp.as_int = 4096
                dp.attributes.append(_attr("direction", direction))
    return req


POINTS_PER_RESOURCE = 7
