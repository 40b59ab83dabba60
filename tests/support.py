"""Test helpers: the real service as a subprocess, real HTTP sinks, hostmetrics-shaped requests."""

from __future__ import annotations

import gzip
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import yaml
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2

from pathwatch.observations import ObservationBatch
from pathwatch.store import Database, FirstSeenStore, Retention
from pathwatch.store.firstseen import ApplyResult

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
if not FIXTURES.exists():  # CI lays shared/ beside the clone; a checkout elsewhere keeps a copy
    FIXTURES = ROOT / "tests" / "fixtures"

EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
RULE = "kubernetes_process_running_from_new_path"
BUILTIN_RULE_IDS = (
    RULE,
    "kubernetes_process_new_path_per_node",
    "kubernetes_previously_unseen_process",
    "kubernetes_process_new_path_in_cluster",
)


@dataclass
class Proc:
    """One process as the hostmetrics process scraper reports it."""

    pid: int
    path: str
    host: str = "node-1"
    cluster: str = "prod"
    name: str | None = None
    owner: str = "root"

    @property
    def exe_name(self) -> str:
        return self.name or self.path.rsplit("/", 1)[-1]


def _attr(key: str, value: str | int) -> common_pb2.KeyValue:
    if isinstance(value, int):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def process_request(procs: Iterable[Proc], time_ms: int) -> ms.ExportMetricsServiceRequest:
    """A request shaped like the collector's: one resource per process, cpu time and memory."""
    req = ms.ExportMetricsServiceRequest()
    t = time_ms * 1_000_000
    for p in procs:
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(
            [
                _attr("process.pid", p.pid),
                _attr("process.parent_pid", 1),
                _attr("process.executable.name", p.exe_name),
                _attr("process.executable.path", p.path),
                _attr("process.command", p.path),
                _attr("process.command_line", p.path + " --serve"),
                _attr("process.owner", p.owner),
                _attr("host.name", p.host),
                _attr("k8s.cluster.name", p.cluster),
                _attr("k8s.node.name", p.host),
            ]
        )
        sm = rm.scope_metrics.add()
        sm.scope.name = "otelcol/hostmetricsreceiver/process"
        cpu = sm.metrics.add(name="process.cpu.time", unit="s")
        cpu.sum.is_monotonic = True
        cpu.sum.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
        for state in ("user", "system", "wait"):
            dp = cpu.sum.data_points.add(time_unix_nano=t, start_time_unix_nano=t - 10**9)
            dp.as_double = 0.5
            dp.attributes.append(_attr("state", state))
        mem = sm.metrics.add(name="process.memory.usage", unit="By")
        mem.sum.data_points.add(time_unix_nano=t, start_time_unix_nano=t - 10**9, as_int=1 << 20)
    return req


def export(
    port: int, request: ms.ExportMetricsServiceRequest, timeout: float = 10.0
) -> ms.ExportMetricsServiceResponse:
    """Send with a raw grpcio client, gzip-compressed as the collector does."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", compression=grpc.Compression.Gzip) as ch:
        call = ch.unary_unary(
            EXPORT,
            request_serializer=ms.ExportMetricsServiceRequest.SerializeToString,
            response_deserializer=ms.ExportMetricsServiceResponse.FromString,
        )
        response: ms.ExportMetricsServiceResponse = call(request, timeout=timeout)
        return response


def fixture_request(time_ms: int, host: str = "node-1") -> ms.ExportMetricsServiceRequest:
    """The collector's golden process output, moved to `time_ms`, with the attributes that
    the resource processor adds in a real deployment."""
    from google.protobuf import json_format

    data = yaml.safe_load((FIXTURES / "otelcol-contrib" / "expected_process.yaml").read_text())
    req = ms.ExportMetricsServiceRequest()
    json_format.ParseDict(data, req)
    t = time_ms * 1_000_000
    for rm in req.resource_metrics:
        rm.resource.attributes.extend(
            [
                _attr("host.name", host),
                _attr("k8s.cluster.name", "prod"),
                _attr("k8s.node.name", host),
            ]
        )
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                for dp in getattr(m, kind).data_points:
                    dp.time_unix_nano = t
    return req


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def minute_floor(ms_: int) -> int:
    return ms_ - ms_ % 60_000


def iso(ms_: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms_ / 1000))


# -- the service as a real process --------------------------------------------------------


_PORT_LINE = re.compile(r'"port": (\d+)')


@dataclass
class ServiceProcess:
    """`python -m pathwatch serve` in a subprocess, on ephemeral loopback ports."""

    data_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    grpc_port: int = 0
    http_port: int = 0
    otlp_http_port: int = 0
    lines: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        cfg = {
            "data_dir": str(self.data_dir),
            "receiver": {"grpc": {"listen": "127.0.0.1:0"}},
            "http": {"listen": "127.0.0.1:0"},
            "log": {"level": "debug", "format": "json"},
            **self.config,
        }
        # The OTLP/HTTP receiver listens on 0.0.0.0:4318 by default: tests that set their own
        # receiver settings still get an ephemeral loopback port unless they name one.
        receiver = cfg["receiver"] = dict(cfg["receiver"])
        receiver["http"] = {"listen": "127.0.0.1:0", **receiver.get("http", {})}
        # Tests write hours of history over OTLP and evaluate the tick they just wrote: unless a
        # test says otherwise, trust every timestamp (the reference search does), let a tick
        # run without waiting for its rule's delay, and alert every new key of a cluster that
        # has no history yet (a test's data dir is always a fresh install).
        receiver.setdefault("max_baseline_lateness", "0s")
        rules = {r["id"]: dict(r) for r in cfg.get("rules", [])}
        for rule_id in BUILTIN_RULE_IDS:
            rule = rules.setdefault(rule_id, {"id": rule_id})
            rule.setdefault("delay", "0s")
            rule.setdefault("no_baseline", "alert")
        cfg["rules"] = list(rules.values())
        path = self.data_dir.parent / f"{self.data_dir.name}-config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PATHWATCH_")}
        env.update(self.env)
        self.lines = []
        self.grpc_port = self.http_port = self.otlp_http_port = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pathwatch", "serve", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        ready: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(ready,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not (self.grpc_port and self.http_port):
            try:
                line = ready.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError("pathwatch did not start:\n" + "\n".join(self.lines)) from None
            if line == "":
                raise RuntimeError("pathwatch exited:\n" + "\n".join(self.lines))
            m = _PORT_LINE.search(line)
            if m and "otlp grpc receiver listening" in line:
                self.grpc_port = int(m.group(1))
            elif m and "admin http listening" in line:
                self.http_port = int(m.group(1))
            elif m and "otlp http receiver listening" in line:
                self.otlp_http_port = int(m.group(1))
        return self

    def _pump(self, ready: queue.Queue[str]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            ready.put(line)
        ready.put("")

    def api(self, method: str, path: str, timeout: float = 15.0) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
        ctype = "json" if body[:1] in (b"{", b"[") else "text"
        return status, json.loads(body) if ctype == "json" else body.decode()

    def evaluate(self, at_ms: int, rule: str = RULE) -> dict[str, Any]:
        status, body = self.api("POST", f"/api/v1/rules/{rule}/evaluate?at={iso(at_ms)}")
        assert status == 200, body
        result: dict[str, Any] = body
        return result

    def kill(self) -> None:
        """kill -9: no chance to flush or close anything."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


# -- a real HTTP sink ---------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpSink:
    """A local HTTP server that records POSTs and answers with scripted statuses.

    `script` is consumed one entry per request: an int status, or (status, headers), or
    ("sleep", seconds) to time out the client; when empty, `default` answers.
    """

    def __init__(self, default: int = 200) -> None:
        self.received: list[Received] = []
        self.script: list[Any] = []
        self.default = default
        self._cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with outer._cond:
                    step = outer.script.pop(0) if outer.script else outer.default
                    outer.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    outer._cond.notify_all()
                headers: dict[str, str] = {}
                if isinstance(step, tuple) and step[0] == "sleep":
                    time.sleep(step[1])
                    step = 200
                elif isinstance(step, tuple):
                    step, headers = step
                payload = b'{"text":"ok","code":0}'
                self.send_response(step)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, args=(0.1,), daemon=True).start()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"got {len(self.received)} requests, wanted {count}")
                self._cond.wait(left)
            return list(self.received)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def wait_drained(svc: ServiceProcess, timeout: float = 20.0) -> None:
    """A positive barrier for "nothing more is delivered": every sink's outbox is empty, so
    every alert recorded so far has been acknowledged by its sink (or dead-lettered)."""

    def drained() -> bool:
        status, body = svc.api("GET", "/api/v1/sinks")
        assert status == 200, body
        return all(s["outbox_depth"] == 0 for s in body["sinks"])

    wait_until(drained, timeout=timeout, interval=0.1)


def pairs(it: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    items = list(it)
    return zip(items[::2], items[1::2], strict=True)


class GatedStore(FirstSeenStore):
    """A real RocksDB store whose writes wait while the gate is closed: a stalled disk.
    `entered` is set once a write has begun."""

    def __init__(self, db: Database, gate_open: bool = True) -> None:
        super().__init__(db)
        self.gate = threading.Event()
        if gate_open:
            self.gate.set()
        self.entered = threading.Event()

    def apply(
        self,
        batch: ObservationBatch,
        retention: Mapping[str, Retention],
        now_ms: int,
        *args: Any,
    ) -> ApplyResult:
        self.entered.set()
        self.gate.wait(30)
        return super().apply(batch, retention, now_ms, *args)
