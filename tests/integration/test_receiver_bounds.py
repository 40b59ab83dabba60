"""Receiver bounds under attack: half-open gRPC streams, slowloris on OTLP/HTTP, OTLP/JSON memory.

Each test runs against the real service (or the real gRPC receiver over a stalled real store)
over loopback sockets on ephemeral ports; every wait is bounded and every socket is closed.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pathwatch.clock import SystemClock
from pathwatch.config.model import GrpcReceiverConfig
from pathwatch.receiver import Decoder, OtlpGrpcReceiver, TimeBounds
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.store import Database, IngestWriter, Retention, WriterConfig
from pathwatch.telemetry.metrics import Metrics
from tests.support import (
    EXPORT,
    GatedStore,
    Proc,
    ServiceProcess,
    export,
    process_request,
    wait_until,
)

pytestmark = pytest.mark.integration

JSON = "application/json"
PROTOBUF = "application/x-protobuf"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def counter(svc: ServiceProcess, name: str, **labels: str) -> float:
    """A sample of the service's /metrics (0 when absent)."""
    status, text = svc.api("GET", "/metrics")
    assert status == 200
    total = 0.0
    for line in str(text).splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def retry_delay(err: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


# -- gRPC -------------------------------------------------------------------------------


def test_half_open_grpc_streams_do_not_starve_other_collectors(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """40 Export streams that start and never finish sending their request (over 4
    connections) do not stop a legitimate collector: its Export from a separate channel
    succeeds and its key is stored (before: RESOURCE_EXHAUSTED "Concurrent RPC limit
    exceeded", without RetryInfo, for as long as the streams were held)."""
    svc = service_factory(tmp_path / "data").start()
    release = threading.Event()

    def never_finishes() -> Iterator[bytes]:
        release.wait(30)
        return
        yield b""  # a generator that sends nothing until released

    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}", options=own_connection)
        for _ in range(4)
    ]
    calls: list[grpc.Future] = []
    try:
        for i in range(40):
            stream = channels[i % 4].stream_unary(EXPORT)
            calls.append(stream.future(never_finishes(), timeout=30))
        for ch in channels:  # the streams are open once each connection is up
            grpc.channel_ready_future(ch).result(timeout=10)
        proc = Proc(4317, "/usr/bin/legit-collector-export")
        try:
            response = export(svc.grpc_port, process_request([proc], now_ms()), timeout=10)
        except grpc.RpcError as exc:  # at worst: retry later, and told when
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert retry_delay(exc) is not None, "UNAVAILABLE without RetryInfo"
            raise AssertionError(f"legitimate export refused: {exc}") from exc
        assert not response.partial_success.rejected_data_points
        _, body = svc.api("GET", "/api/v1/keys?path=/usr/bin/legit-collector-export")
        assert len(body["keys"]) == 1
    finally:
        release.set()
        for call in calls:
            call.cancel()
        for ch in channels:
            ch.close()


@pytest.fixture
def stalled_grpc(tmp_path: Path) -> Iterator[tuple[OtlpGrpcReceiver, GatedStore, Metrics]]:
    """The real gRPC receiver (one worker) over a real RocksDB store whose disk stalls."""
    db = Database(str(tmp_path / "db"))
    store = GatedStore(db, gate_open=False)
    metrics = Metrics()
    retention = {PARITY_RULE.id: Retention(horizon_minutes=31 * 1440)}
    writer = IngestWriter(
        store, lambda: retention, SystemClock(), metrics, WriterConfig(max_pending_keys=10_000)
    )
    writer.start()
    now = now_ms()
    receiver = OtlpGrpcReceiver(
        GrpcReceiverConfig(listen="127.0.0.1:0", max_workers=1, ack_timeout=20.0),
        Decoder([PARITY_RULE]),
        writer,
        lambda: TimeBounds(now - 86_400_000, now + 300_000),
        metrics,
    )
    receiver.start()
    try:
        yield receiver, store, metrics
    finally:
        store.gate.set()
        receiver.shutdown(1)
        writer.shutdown(5)
        db.close()


def test_grpc_overload_is_unavailable_with_retry_info_and_counted(
    stalled_grpc: tuple[OtlpGrpcReceiver, GatedStore, Metrics],
) -> None:
    """With the worker busy and its queue full, one more Export is answered at once with
    UNAVAILABLE + RetryInfo (never a bare RESOURCE_EXHAUSTED) and counted in
    pathwatch_receiver_overload_total{receiver="grpc", reason="workers"}; the queued exports
    complete once the disk recovers."""
    receiver, store, metrics = stalled_grpc
    assert receiver.port
    capacity = receiver.capacity
    results: list[object] = []

    def send(pid: int) -> None:
        try:
            export(receiver.port or 0, process_request([Proc(pid, f"/q/{pid}")], now_ms()), 30)
            results.append("ok")
        except grpc.RpcError as exc:
            results.append(exc.code())

    senders = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(capacity)]
    try:
        for t in senders:
            t.start()
        assert store.entered.wait(10)
        wait_until(lambda: receiver.in_flight == capacity, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            export(receiver.port, process_request([Proc(9, "/one/more")], now_ms()), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert retry_delay(err.value) == 1.0
        sample = metrics.registry.get_sample_value(
            "pathwatch_receiver_overload_total", {"receiver": "grpc", "reason": "workers"}
        )
        assert sample == 1.0
    finally:
        store.gate.set()
        for t in senders:
            t.join(30)
    assert results == ["ok"] * capacity


# -- OTLP/HTTP --------------------------------------------------------------------------


def _slowloris(port: int, count: int, stop: threading.Event) -> tuple[threading.Thread, list]:
    """`count` connections that send a request head one byte at a time and never finish it;
    a connection the server closes is not reopened."""
    head = (
        b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nX-Pad: "
    )
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    closed: list[socket.socket] = []

    def trickle() -> None:
        i = 0
        while not stop.is_set() and len(closed) < len(socks):
            for s in socks:
                if s in closed:
                    continue
                try:
                    s.send(head[i : i + 1] if i < len(head) else b"a")
                except OSError:
                    closed.append(s)
            i += 1
            stop.wait(0.05)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    return thread, [socks, closed]


def _post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("POST", "/v1/metrics", body, headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_slowloris_connections_do_not_stop_otlp_http_exports(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """40 connections trickling a request head a byte at a time (more than every connection
    slot) are cut off at receiver.http.read_timeout and counted (reason read_timeout); a
    legitimate OTLP/HTTP export then succeeds (before: refused for as long as they trickled)."""
    svc = service_factory(
        tmp_path / "data",
        {"receiver": {"http": {"listen": "127.0.0.1:0", "read_timeout": "1s"}}},
    ).start()
    port = svc.otlp_http_port
    stop = threading.Event()
    thread, (socks, _) = _slowloris(port, 40, stop)
    proc = Proc(4318, "/usr/bin/legit-http-export")
    body = process_request([proc], now_ms()).SerializeToString()
    answers: list[object] = []

    def exported() -> bool:
        try:
            status, _, _ = _post(port, body, {"Content-Type": PROTOBUF})
        except OSError as exc:  # closed past every bound: a real client retries
            answers.append(type(exc).__name__)
            return False
        answers.append(status)
        return status == 200

    try:
        wait_until(exported, timeout=20, interval=0.2)
        # The trickling connections are cut at the read timeout whether the export got a
        # slot before that or only after (it may, while they are still being opened).
        wait_until(lambda: counter(svc, "pathwatch_receiver_overload_total", receiver="http",
                                   reason="read_timeout") >= 1, timeout=10)  # fmt: skip
    finally:
        stop.set()
        thread.join(5)
        for s in socks:
            s.close()
    _, keys = svc.api("GET", "/api/v1/keys?path=/usr/bin/legit-http-export")
    assert len(keys["keys"]) == 1


def test_json_decodes_past_the_bound_get_503_and_are_counted(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """While max_concurrent_json_decodes OTLP/JSON requests are being read and decoded, another
    JSON export is answered 503 + Retry-After without being read and counted (reason
    json_decodes); protobuf exports are not affected, and JSON is accepted again after."""
    svc = service_factory(
        tmp_path / "data",
        {"receiver": {"http": {"listen": "127.0.0.1:0", "read_timeout": "10s",
                               "max_concurrent_json_decodes": 1}}},
    ).start()  # fmt: skip
    port = svc.otlp_http_port
    request = process_request([Proc(7, "/usr/bin/json-export")], now_ms())
    body = json_format.MessageToJson(request).encode()
    holder = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:  # a JSON export whose body is slow to arrive holds the only decode slot
        holder.sendall(
            b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        answers: list[int] = []

        def refused() -> bool:
            status, headers, _ = _post(port, body, {"Content-Type": JSON})
            answers.append(status)
            if status == 503:
                assert int(headers["Retry-After"]) >= 1
            return status == 503

        wait_until(refused, timeout=8, interval=0.1)
        assert set(answers) <= {200, 503}
        protobuf = process_request([Proc(8, "/usr/bin/pb-export")], now_ms())
        assert _post(port, protobuf.SerializeToString(), {"Content-Type": PROTOBUF})[0] == 200
    finally:
        holder.close()
    assert counter(svc, "pathwatch_receiver_overload_total", receiver="http",
                   reason="json_decodes") >= 1  # fmt: skip
    wait_until(lambda: _post(port, body, {"Content-Type": JSON})[0] == 200, timeout=10)


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def test_concurrent_large_json_bodies_keep_rss_under_the_chart_request(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """8 concurrent 60 MiB OTLP/JSON bodies (gzipped to a few hundred kB) are refused (413
    naming max_json_message_size, or 503 while the decode slots are taken) and the service's
    peak RSS (VmHWM) stays under 512 MiB, the Helm chart's memory request (before: ~5 GB)."""
    svc = service_factory(tmp_path / "data").start()
    assert svc.proc is not None
    pid = svc.proc.pid
    request = process_request([Proc(i, f"/opt/app/bin/worker-{i}") for i in range(20)], now_ms())
    unit = json.dumps(json_format.MessageToDict(request)["resourceMetrics"])[1:-1]
    copies = (60 << 20) // len(unit) + 1
    raw = ('{"resourceMetrics":[' + ",".join([unit] * copies) + "]}").encode()
    assert len(raw) >= 60 << 20
    body = gzip.compress(raw, compresslevel=6)
    del raw
    limit_kib = 512 * 1024
    watchdog_stop = threading.Event()
    seen = [0]

    def watchdog() -> None:  # an unbounded service must not take the test machine down
        while not watchdog_stop.wait(0.05):
            with contextlib.suppress(OSError):
                seen[0] = max(seen[0], _vm_kib(pid, "VmRSS"))
                if seen[0] > 2 * limit_kib:
                    svc.kill()
                    return

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    headers = {"Content-Type": JSON, "Content-Encoding": "gzip"}
    answers: list[tuple[int, bytes] | str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def send() -> None:
        barrier.wait(10)
        try:
            status, _, answer = _post(svc.otlp_http_port, body, headers)
            with lock:
                answers.append((status, answer))
        except OSError as exc:
            with lock:
                answers.append(repr(exc))

    senders = [threading.Thread(target=send, daemon=True) for _ in range(8)]
    try:
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)
        with contextlib.suppress(OSError):
            seen[0] = max(seen[0], _vm_kib(pid, "VmHWM"))
        peak = seen[0]
    finally:
        watchdog_stop.set()
        guard.join(5)
    assert peak < limit_kib, f"peak RSS {peak} KiB"
    assert len(answers) == 8 and all(isinstance(a, tuple) for a in answers), answers
    statuses = sorted(a[0] for a in answers if isinstance(a, tuple))
    assert set(statuses) <= {413, 503}, statuses
    assert 413 in statuses
    too_large = next(a[1] for a in answers if isinstance(a, tuple) and a[0] == 413)
    assert b"max_json_message_size" in too_large
