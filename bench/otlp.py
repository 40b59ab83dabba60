"""The shape of the benchmark's requests: hostmetrics process resources, encoded as bytes.

One request is one node's scrape, as the collector's `hostmetrics` process scraper sends it:
process resources with the collector's resource attributes (host and k8s ones added by its
processors) and 11 process metrics (19 data points). `Process.resource` and `ScrapeBlocks`
encode the parts once; a request is their concatenation with the scrape's timestamp patched in.
`check_export` verifies the bytes against the opentelemetry-proto classes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from bench import wire

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

SCOPE_NAME = (
    "github.com/open-telemetry/opentelemetry-collector-contrib/receiver/hostmetricsreceiver"
    "/internal/scraper/processscraper"
)
SCOPE_VERSION = "0.115.0"
SCHEMA_URL = "https://opentelemetry.io/schemas/1.9.0"
# Every data point's time_unix_nano in a scrape template; replaced by the scrape's time.
_PLACEHOLDER_NS = 0x5A17_C0DE_5A17_C0DE
_PLACEHOLDER = wire.fixed64_bytes(_PLACEHOLDER_NS)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One process metric of the hostmetrics receiver; one data point per attribute value."""

    name: str
    description: str
    unit: str
    monotonic: bool | None  # None: a gauge
    integer: bool
    attribute: str = ""
    values: tuple[str, ...] = ("",)


PROCESS_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("process.cpu.time", "Total CPU seconds broken down by different states.", "s",
               True, False, "state", ("user", "system", "wait")),
    MetricSpec("process.cpu.utilization",
               "Percentage of total CPU time used by the process since last scrape, expressed "
               "as a value between 0 and 1.", "1", None, False, "state",
               ("user", "system", "wait")),
    MetricSpec("process.memory.usage", "The amount of physical memory in use.", "By", False,
               True),
    MetricSpec("process.memory.virtual", "Virtual memory size.", "By", False, True),
    MetricSpec("process.memory.utilization",
               "Percentage of total physical memory that is used by the process.", "1", None,
               False),
    MetricSpec("process.disk.io", "Disk bytes transferred.", "By", True, True, "direction",
               ("read", "write")),
    MetricSpec("process.disk.operations", "Number of disk operations performed by the process.",
               "{operations}", True, True, "direction", ("read", "write")),
    MetricSpec("process.threads", "Process threads count.", "{threads}", False, True),
    MetricSpec("process.open_file_descriptors",
               "Number of file descriptors in use by the process.", "{count}", False, True),
    MetricSpec("process.context_switches",
               "Number of times the process has been context switched.", "{count}", True, True,
               "context_switch_type", ("involuntary", "voluntary")),
    MetricSpec("process.paging.faults", "Number of page faults the process has made.",
               "{faults}", True, True, "type", ("major", "minor")),
)  # fmt: skip
POINTS_PER_RESOURCE = sum(len(m.values) for m in PROCESS_METRICS)

# Executables of a typical Kubernetes node: (path, owner, arguments).
_SYSTEM_EXECUTABLES = (
    ("/usr/lib/systemd/systemd", "root", "--switched-root --system --deserialize 31"),
    ("/usr/lib/systemd/systemd-journald", "root", ""),
    ("/usr/bin/containerd", "root", ""),
    ("/usr/bin/containerd-shim-runc-v2", "root",
     "-namespace k8s.io -address /run/containerd/containerd.sock"),
    ("/usr/bin/kubelet", "root",
     "--config=/var/lib/kubelet/config.yaml --kubeconfig=/etc/kubernetes/kubelet.conf"),
    ("/pause", "65535", ""),
    ("/usr/local/bin/kube-proxy", "root", "--config=/var/lib/kube-proxy/config.conf"),
    ("/coredns", "root", "-conf /etc/coredns/Corefile"),
    ("/usr/local/bin/otelcol-contrib", "10001", "--config=/conf/relay.yaml"),
    ("/usr/bin/fluent-bit", "root", "-c /fluent-bit/etc/fluent-bit.conf"),
    ("/bin/node_exporter", "65534", "--path.rootfs=/host --web.listen-address=:9100"),
    ("/usr/sbin/chronyd", "chrony", "-F 2"),
    ("/usr/sbin/sshd", "root", "-D"),
    ("/app/aws-vpc-cni", "root", ""),
    ("/usr/local/bin/envoy", "101", "-c /etc/envoy/envoy.yaml --service-cluster ingress"),
    ("/usr/sbin/nginx", "101", "-g daemon off;"),
    ("/usr/bin/python3.11", "1000", "-m gunicorn app:wsgi --workers 4 --bind 0.0.0.0:8000"),
    ("/usr/local/bin/node", "1000", "/app/dist/server.js"),
    ("/opt/java/openjdk/bin/java", "1000", "-Xms512m -Xmx2g -jar /app/service.jar"),
    ("/usr/local/bin/redis-server", "999", "*:6379"),
    ("/usr/lib/postgresql/16/bin/postgres", "999", "-D /var/lib/postgresql/data"),
    ("/bin/bash", "root", "/usr/local/bin/entrypoint.sh"),
    ("/usr/bin/tini", "root", "-- /docker-entrypoint.sh"),
    ("/app/server", "65532", "--port=8080 --metrics-port=9090"),
)  # fmt: skip
_TEAMS = ("payments", "search", "checkout", "identity", "ledger", "media", "ads", "maps")
_APP_EXECUTABLES = tuple(
    (f"/opt/{team}/svc-{k}/bin/{team}-svc-{k}", "1000", f"--config /etc/{team}/svc-{k}.yaml")
    for team in _TEAMS
    for k in range(8)
)
EXECUTABLES = _SYSTEM_EXECUTABLES + _APP_EXECUTABLES
CLUSTERS = ("prod-eu-1", "prod-eu-2", "prod-us-1", "prod-ap-1")


def node_host(node: int) -> str:
    """The host (and k8s node) name of node number `node`, unique below 65536 nodes."""
    return f"ip-10-{node // 256 % 256}-{node % 256}-{17 + node // 65536}.ec2.internal"


def node_cluster(node: int) -> str:
    return CLUSTERS[node % len(CLUSTERS)]


@dataclass(frozen=True, slots=True)
class Process:
    """One process as the collector reports it (host attributes added by its processors)."""

    host: str
    cluster: str
    pid: int
    parent_pid: int
    executable: int  # index into EXECUTABLES

    @property
    def path(self) -> str:
        return EXECUTABLES[self.executable][0]

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def key(self) -> tuple[str, ...]:
        """The parity rule's key, as pathwatch normalises it (pid as text)."""
        return (self.host, self.cluster, self.host, str(self.pid), self.path, self.name)

    def resource(self) -> bytes:
        """The encoded Resource message: the collector's attribute order and types."""
        return b"".join(
            (
                _attr_int("process.pid", self.pid),
                _attr_int("process.parent_pid", self.parent_pid),
                _executable_attrs(self.executable),
                _host_attrs(self.host, self.cluster),
            )
        )


@functools.cache
def _executable_attrs(executable: int) -> bytes:
    path, owner, args = EXECUTABLES[executable]
    return b"".join(
        (
            _attr_str("process.executable.name", path.rsplit("/", 1)[-1]),
            _attr_str("process.executable.path", path),
            _attr_str("process.command", path),
            _attr_str("process.command_line", f"{path} {args}".rstrip()),
            _attr_str("process.owner", owner),
        )
    )


@functools.lru_cache(maxsize=4096)
def _host_attrs(host: str, cluster: str) -> bytes:
    return b"".join(
        (
            _attr_str("host.name", host),
            _attr_str("k8s.cluster.name", cluster),
            _attr_str("k8s.node.name", host),
        )
    )


def _attr_str(key: str, value: str) -> bytes:
    return wire.length_delimited(
        1, wire.string(1, key) + wire.length_delimited(2, wire.string(1, value))
    )


def _attr_int(key: str, value: int) -> bytes:
    return wire.length_delimited(
        1, wire.string(1, key) + wire.length_delimited(2, wire.uint(3, value))
    )


class ScrapeBlocks:
    """The metrics part of a process resource, in `variants` sets of values.

    `at(time_ns)` returns, per variant, the ResourceMetrics fields after the resource
    (scope_metrics and schema_url) with every data point stamped `time_ns`: one bytes.replace
    per variant instead of encoding 19 points per process.
    """

    def __init__(self, variants: int = 16, start_time_ns: int = 1_700_000_000 * 10**9) -> None:
        self._templates = [self._encode(v, start_time_ns) for v in range(variants)]
        for template in self._templates:
            if template.count(_PLACEHOLDER) != POINTS_PER_RESOURCE:
                raise AssertionError("timestamp placeholder collides with encoded content")

    @property
    def variants(self) -> int:
        return len(self._templates)

    def at(self, time_ns: int) -> list[bytes]:
        stamp = wire.fixed64_bytes(time_ns)
        return [t.replace(_PLACEHOLDER, stamp) for t in self._templates]

    @staticmethod
    def _encode(variant: int, start_ns: int) -> bytes:
        metrics = []
        for m_index, spec in enumerate(PROCESS_METRICS):
            points = []
            for p_index, value in enumerate(spec.values):
                seed = (variant + 1) * 7919 + m_index * 104729 + p_index * 1299709
                point = wire.fixed64(2, start_ns) + wire.fixed64(3, _PLACEHOLDER_NS)
                if spec.integer:
                    point += wire.fixed64(6, seed * 4099 % (1 << 40))
                else:
                    point += wire.double(4, (seed % 100_000) / 1000.0)
                if spec.attribute:
                    point += _attr_str(spec.attribute, value)
                points.append(wire.length_delimited(1, point))
            data = b"".join(points)
            if spec.monotonic is None:
                body = wire.length_delimited(5, data)  # gauge
            else:
                summed = data + wire.uint(2, 2)  # AGGREGATION_TEMPORALITY_CUMULATIVE
                if spec.monotonic:
                    summed += wire.uint(3, 1)
                body = wire.length_delimited(7, summed)
            metrics.append(
                wire.length_delimited(
                    2,
                    wire.string(1, spec.name)
                    + wire.string(2, spec.description)
                    + wire.string(3, spec.unit)
                    + body,
                )
            )
        scope = wire.length_delimited(1, wire.string(1, SCOPE_NAME) + wire.string(2, SCOPE_VERSION))
        return wire.length_delimited(2, scope + b"".join(metrics)) + wire.string(3, SCHEMA_URL)


def resource_metrics_head(resource: bytes, tail_len: int) -> bytes:
    """Request field 1 (one ResourceMetrics) up to its scope metrics, which follow it."""
    inner = wire.length_delimited(1, resource)
    return wire.tag(1, 2) + wire.varint(len(inner) + tail_len) + inner


class Export(NamedTuple):
    """One serialized ExportMetricsServiceRequest and what it holds."""

    payload: bytes
    resources: int
    points: int
    new_keys: int  # keys this request observes for the first time (HistoryPlan only)
    time_ms: int
    node: int = -1  # the node that scraped it (Fleet only): its collector's connection


def check_export(export: Export) -> None:
    """Parse `export` with opentelemetry-proto and check it holds what it claims to.

    Raises AssertionError on any mismatch: the byte-level encoder is only trusted once checked.
    """
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    request = ExportMetricsServiceRequest.FromString(export.payload)
    if len(request.resource_metrics) != export.resources:
        raise AssertionError("resource count differs")
    points = 0
    for rm in request.resource_metrics:
        attrs = {kv.key for kv in rm.resource.attributes}
        if len(attrs) != 10 or "process.pid" not in attrs:
            raise AssertionError(f"unexpected resource attributes {sorted(attrs)}")
        for sm in rm.scope_metrics:
            if len(sm.metrics) != len(PROCESS_METRICS):
                raise AssertionError("metric count differs")
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind is None:
                    raise AssertionError(f"metric {metric.name} has no data")
                data = getattr(metric, kind)
                for dp in data.data_points:
                    points += 1
                    if dp.time_unix_nano != export.time_ms * 1_000_000:
                        raise AssertionError("data point timestamp differs")
    if points != export.points:
        raise AssertionError(f"{points} data points, expected {export.points}")
