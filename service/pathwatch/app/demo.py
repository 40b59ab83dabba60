"""`pathwatch demo`: a small simulated cluster, a planted intrusion, the alert it raises.

Runs the real service (gRPC receiver, RocksDB store, rule engine) on temporary storage, feeds it
hostmetrics-shaped exports over loopback, and prints the resulting risk event. Exits by itself.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from typing import TextIO

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms
from opentelemetry.proto.common.v1 import common_pb2

from pathwatch.config.model import (
    Config,
    Duration,
    GrpcReceiverConfig,
    HttpConfig,
    HttpReceiverConfig,
    LogConfig,
    ReceiverConfig,
    RuleConfig,
)

NODES = [f"ip-10-0-{i}-{10 + i}.ec2.internal" for i in range(1, 6)]
CLUSTER = "demo-cluster"
FLEET = [
    "/usr/bin/containerd", "/usr/bin/kubelet", "/usr/sbin/sshd", "/usr/bin/python3",
    "/usr/local/bin/node-exporter", "/usr/bin/dockerd", "/pause", "/usr/bin/coredns",
]  # fmt: skip
INTRUDER_NODE = NODES[2]
INTRUDER_PATH = "/tmp/.cache/python3"
_EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


def _attr(key: str, value: str | int) -> common_pb2.KeyValue:
    v = (
        common_pb2.AnyValue(int_value=value)
        if isinstance(value, int)
        else common_pb2.AnyValue(string_value=value)
    )
    return common_pb2.KeyValue(key=key, value=v)


def scrape(node: str, procs: list[tuple[int, str]], time_ms: int) -> ms.ExportMetricsServiceRequest:
    """One node's process scrape, shaped like the hostmetrics receiver's output."""
    req = ms.ExportMetricsServiceRequest()
    t = time_ms * 1_000_000
    for pid, path in procs:
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(
            [
                _attr("process.pid", pid),
                _attr("process.executable.name", path.rsplit("/", 1)[-1]),
                _attr("process.executable.path", path),
                _attr("process.command_line", path),
                _attr("host.name", node),
                _attr("k8s.node.name", node),
                _attr("k8s.cluster.name", CLUSTER),
            ]
        )
        metric = rm.scope_metrics.add().metrics.add(name="process.memory.usage", unit="By")
        metric.sum.data_points.add(time_unix_nano=t, as_int=42 << 20)
    return req


def run_demo(out: TextIO) -> int:
    from pathwatch.app.service import Service
    from pathwatch.rules import PARITY_RULE_ID
    from pathwatch.telemetry.logging import configure_logging

    started = time.monotonic()
    configure_logging("error", "console")
    workdir = tempfile.mkdtemp(prefix="pathwatch-demo-")
    config = Config(
        data_dir=workdir,
        # Every listener on an ephemeral loopback port: the demo runs beside real collectors.
        # The demo replays hours of history over OTLP, so it trusts every timestamp (as the
        # reference search does), and its tick runs at once rather than after the rule's delay.
        receiver=ReceiverConfig(
            grpc=GrpcReceiverConfig(listen="127.0.0.1:0"),
            http=HttpReceiverConfig(listen="127.0.0.1:0"),
            max_baseline_lateness=Duration(0.0),
        ),
        http=HttpConfig(listen="127.0.0.1:0"),
        log=LogConfig(level="error"),
        rules=[RuleConfig(id=PARITY_RULE_ID, delay=Duration(0.0))],
    )
    service = Service(config)

    def say(text: str) -> None:
        out.write(f"[{time.monotonic() - started:5.1f}s] {text}\n")
        out.flush()

    try:
        service.start(serve_http=False)
        assert service.receiver is not None and service.runner is not None
        say(f"pathwatch started on temporary storage {workdir}")
        now = time.time_ns() // 1_000_000
        tick = now - now % 60_000
        with grpc.insecure_channel(
            f"127.0.0.1:{service.receiver.port}", compression=grpc.Compression.Gzip
        ) as channel:
            export = channel.unary_unary(
                _EXPORT,
                request_serializer=ms.ExportMetricsServiceRequest.SerializeToString,
                response_deserializer=ms.ExportMetricsServiceResponse.FromString,
            )
            hours = 6
            say(f"seeding a baseline: {len(NODES)} nodes x {len(FLEET)} processes, "
                f"{hours} hours of scrapes")  # fmt: skip
            for h in range(hours, 0, -1):
                for n, node in enumerate(NODES):
                    procs = [(1000 * n + i + 1, p) for i, p in enumerate(FLEET)]
                    export(scrape(node, procs, tick - h * 3_600_000), timeout=10)
            say(f"planting an intrusion: {INTRUDER_PATH} runs on {INTRUDER_NODE}")
            export(scrape(INTRUDER_NODE, [(31337, INTRUDER_PATH)], tick - 60_000), timeout=10)
            for n, node in enumerate(NODES):  # the fleet keeps running as usual
                procs = [(1000 * n + i + 1, p) for i, p in enumerate(FLEET)]
                export(scrape(node, procs, tick - 60_000), timeout=10)
        rule = next(r for r in service.rules if r.id == PARITY_RULE_ID)
        say("evaluating the rule, as the hourly tick would")
        outcome = service.runner.run(rule, tick)
        for alert in outcome.alerts:
            out.write(json.dumps(alert, indent=2) + "\n")
        summary = outcome.alerts[0].get("context", {}).get("summary") if outcome.alerts else None
        say(f"{len(outcome.alerts)} alert(s)" + (f": {summary}" if summary else ""))
        return 0 if len(outcome.alerts) == 1 else 1
    finally:
        service.shutdown(5)
        shutil.rmtree(workdir, ignore_errors=True)
