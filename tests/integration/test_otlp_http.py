"""OTLP/HTTP receiver: protobuf and JSON, gzip, OTLP/HTTP status codes, bounds, real exporters.

The receiver runs in-process on an ephemeral loopback port over a real IngestWriter and a real
RocksDB store in a temp dir; requests are sent with urllib / http.client as raw clients.
"""

from __future__ import annotations

import gzip
import http.client
import json
import ssl
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms

from pathwatch.access import BearerToken, TlsFiles
from pathwatch.clock import SystemClock
from pathwatch.receiver import Decoder, TimeBounds
from pathwatch.receiver.http_server import HttpReceiverConfig, OtlpHttpReceiver
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.store import Database, IngestWriter, Retention, WriterConfig
from pathwatch.telemetry.metrics import Metrics
from tests.support import FIXTURES, RULE, GatedStore, Proc, fixture_request, process_request

pytestmark = pytest.mark.integration

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
DAY_MS = 86_400_000
TOKEN = "http-ingest-token"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Rig:
    receiver: OtlpHttpReceiver
    store: GatedStore
    metrics: Metrics
    decoder: Decoder
    bounds: TimeBounds

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.receiver.port}/v1/metrics"

    def counted(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    cleanups: list[Callable[[], None]] = []

    def make(
        max_size: int = 64 << 20,
        ack_timeout: float = 10.0,
        max_pending_keys: int = 50_000,
        max_concurrent: int = 32,
        token: BearerToken | None = None,
        tls: TlsFiles | None = None,
    ) -> Rig:
        db = Database(str(tmp_path / f"db{len(cleanups)}"))
        store = GatedStore(db)
        metrics = Metrics()
        retention = {RULE: Retention(horizon_minutes=31 * 1440)}
        writer = IngestWriter(
            store, lambda: retention, SystemClock(), metrics, WriterConfig(max_pending_keys)
        )
        writer.start()
        now = now_ms()
        bounds = TimeBounds(now - DAY_MS, now + 300_000)
        decoder = Decoder([PARITY_RULE])
        receiver = OtlpHttpReceiver(
            HttpReceiverConfig(
                listen="127.0.0.1:0",
                max_receive_message_size=max_size,
                ack_timeout=ack_timeout,
                max_concurrent_requests=max_concurrent,
            ),
            decoder,
            writer,
            lambda: bounds,
            metrics,
            token=token,
            tls=tls,
        )
        receiver.start()

        def cleanup() -> None:
            store.gate.set()
            receiver.shutdown(1)
            writer.shutdown(5)
            db.close()

        cleanups.append(cleanup)
        return Rig(receiver, store, metrics, decoder, bounds)

    yield make
    for cleanup in reversed(cleanups):
        cleanup()


def post(
    url: str,
    body: bytes,
    content_type: str = PROTOBUF,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    context: ssl.SSLContext | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": content_type, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=15, context=context) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def status_of(body: bytes, content_type: str = PROTOBUF) -> status_pb2.Status:
    status = status_pb2.Status()
    if content_type == JSON:
        json_format.Parse(body, status)
    else:
        status.ParseFromString(body)
    return status


def key_of(proc: Proc) -> tuple[str, ...]:
    return (proc.host, proc.cluster, proc.host, str(proc.pid), proc.path, proc.exe_name)


# -- accepted requests ------------------------------------------------------------------


def test_protobuf_export_is_durable_and_answered_in_protobuf(make_rig: Callable[..., Rig]) -> None:
    """A binary protobuf export is stored before 200 is answered, with an empty
    ExportMetricsServiceResponse (no partial_success) in application/x-protobuf."""
    rig = make_rig()
    now = now_ms()
    status, headers, body = post(
        rig.url, process_request([Proc(7, "/tmp/x")], now).SerializeToString()
    )
    assert status == 200
    assert headers["Content-Type"] == PROTOBUF
    assert not ms.ExportMetricsServiceResponse.FromString(body).HasField("partial_success")
    state = rig.store.get(RULE, key_of(Proc(7, "/tmp/x")))
    assert state is not None and state.first_seen_ms == now
    assert rig.counted("pathwatch_export_requests_total", outcome="ok") == 1
    assert rig.counted("pathwatch_data_points_total", outcome="accepted") == 4


def test_json_spec_example_is_accepted_and_ignored(make_rig: Callable[..., Rig]) -> None:
    """The OTLP specification's JSON example (no process metrics) is answered 200 with an
    empty JSON response and stores nothing."""
    rig = make_rig()
    status, headers, body = post(
        rig.url, (FIXTURES / "otlp-examples" / "metrics.json").read_bytes(), JSON
    )
    assert status == 200, body
    assert headers["Content-Type"] == JSON
    assert json.loads(body) == {}
    assert rig.counted("pathwatch_resources_total", outcome="ignored") == 1
    assert rig.store.count_keys(RULE) == 0


def test_json_collector_output_means_what_protobuf_means(make_rig: Callable[..., Rig]) -> None:
    """The collector's process-scraper output sent as OTLP/JSON stores exactly the keys and
    first-seen times that decoding the same request as protobuf yields."""
    rig = make_rig()
    request = fixture_request(now_ms())
    status, _, body = post(rig.url, json_format.MessageToJson(request).encode(), JSON)
    assert status == 200, body
    expected = rig.decoder.decode(request.SerializeToString(), rig.bounds).batch
    assert {key for _, key in expected} == {
        ("node-1", "prod", "node-1", "95041", "/bin/sleep", "sleep"),
        ("node-1", "prod", "node-1", "4668", "sleep", "sleep"),
    }
    for (rule, key), sighting in expected.items():
        state = rig.store.get(rule, key)
        assert state is not None, key
        assert (state.first_seen_ms, state.last_seen_ms) == (sighting.first_ms, sighting.last_ms)
    assert rig.store.count_keys(RULE) == len(expected)


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_gzip_bodies_are_accepted(make_rig: Callable[..., Rig], content_type: str) -> None:
    """Content-Encoding: gzip is inflated, for protobuf and JSON bodies alike."""
    rig = make_rig()
    request = process_request([Proc(3, "/usr/bin/gz")], now_ms())
    raw = (
        request.SerializeToString()
        if content_type == PROTOBUF
        else json_format.MessageToJson(request).encode()
    )
    status, _, body = post(rig.url, gzip.compress(raw), content_type, {"Content-Encoding": "gzip"})
    assert status == 200, body
    assert rig.store.get(RULE, key_of(Proc(3, "/usr/bin/gz"))) is not None


def test_partial_success_uses_otlp_json_field_names(make_rig: Callable[..., Rig]) -> None:
    """Points older than the horizon are rejected through partialSuccess, in lowerCamelCase
    with the int64 count as a string; the rest of the request is kept."""
    rig = make_rig()
    now = now_ms()
    request = process_request([Proc(1, "/bin/new")], now)
    request.resource_metrics.extend(
        process_request([Proc(2, "/bin/old")], now - 3 * DAY_MS).resource_metrics
    )
    status, headers, body = post(rig.url, json_format.MessageToJson(request).encode(), JSON)
    assert status == 200
    assert headers["Content-Type"] == JSON
    partial = json.loads(body)["partialSuccess"]
    assert partial["rejectedDataPoints"] == "4"
    assert "older than the retention horizon" in partial["errorMessage"]
    assert rig.store.get(RULE, key_of(Proc(1, "/bin/new"))) is not None
    assert rig.store.get(RULE, key_of(Proc(2, "/bin/old"))) is None
    status, _, body = post(rig.url, request.SerializeToString())
    assert (
        ms.ExportMetricsServiceResponse.FromString(body).partial_success.rejected_data_points == 4
    )
    assert rig.counted("pathwatch_export_requests_total", outcome="partial") == 2


def test_keep_alive_serves_several_requests_on_one_connection(
    make_rig: Callable[..., Rig],
) -> None:
    """An HTTP/1.1 client (like the collector's) reuses its connection between exports."""
    rig = make_rig()
    assert rig.receiver.port
    conn = http.client.HTTPConnection("127.0.0.1", rig.receiver.port, timeout=10)
    sockets = []
    try:
        for pid in (1, 2):
            body = process_request([Proc(pid, "/bin/ka")], now_ms()).SerializeToString()
            conn.request("POST", "/v1/metrics", body, {"Content-Type": PROTOBUF})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            assert resp.getheader("Connection") != "close"
            sockets.append(conn.sock)
    finally:
        conn.close()
    assert sockets[0] is not None and sockets[0] is sockets[1]


# -- refused requests -------------------------------------------------------------------


def test_other_content_types_and_encodings_are_415(make_rig: Callable[..., Rig]) -> None:
    """A content type other than protobuf or JSON, or an encoding other than gzip, is 415
    with a google.rpc.Status naming what to send."""
    rig = make_rig()
    body = process_request([Proc(1, "/bin/a")], now_ms()).SerializeToString()
    status, _, answer = post(rig.url, body, "text/plain")
    assert status == 415
    assert "application/x-protobuf" in status_of(answer).message
    status, _, answer = post(rig.url, body, PROTOBUF, {"Content-Encoding": "zstd"})
    assert status == 415
    assert "zstd" in status_of(answer).message
    assert rig.counted("pathwatch_export_requests_total", outcome="invalid") == 2


@pytest.mark.parametrize(
    ("content_type", "body"),
    [(PROTOBUF, b"\xff\xff\xff"), (JSON, b'{"resourceMetrics": 5}'), (JSON, b"[]"),
     (JSON, b"\xff{")],
)  # fmt: skip
def test_undecodable_bodies_are_400_with_bad_request(
    make_rig: Callable[..., Rig], content_type: str, body: bytes
) -> None:
    """A body that is not an ExportMetricsServiceRequest is 400 (permanent) with a Status in
    the request's encoding carrying a google.rpc.BadRequest."""
    rig = make_rig()
    status, headers, answer = post(rig.url, body, content_type)
    assert status == 400
    assert headers["Content-Type"] == content_type
    parsed = status_of(answer, content_type)
    assert parsed.code == 3  # INVALID_ARGUMENT
    details = error_details_pb2.BadRequest()
    assert any(d.Unpack(details) for d in parsed.details)
    assert rig.counted("pathwatch_export_requests_total", outcome="invalid") == 1


def test_oversized_body_is_413_and_read_no_further(make_rig: Callable[..., Rig]) -> None:
    """A body declared larger than max_receive_message_size is answered 413 (the client
    sees the answer, not a reset) and nothing of it is decoded."""
    rig = make_rig(max_size=1 << 20)
    status, _, answer = post(rig.url, b"\x0a" * (2 << 20))
    assert status == 413
    assert "exceeds the limit" in status_of(answer).message
    assert rig.counted("pathwatch_export_request_bytes_count") == 0


def test_gzip_bomb_is_413_without_inflating_it(make_rig: Callable[..., Rig]) -> None:
    """64 MiB of zeros gzipped to ~64 KiB is refused with 413 once the inflated size passes
    the 1 MiB limit: memory stays near the limit, far from the bomb's 64 MiB."""
    rig = make_rig(max_size=1 << 20)
    bomb = gzip.compress(bytes(64 << 20), compresslevel=9)
    assert len(bomb) < 128 << 10
    tracemalloc.start()
    try:
        status, _, answer = post(rig.url, bomb, PROTOBUF, {"Content-Encoding": "gzip"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413
    assert "after decompression" in status_of(answer).message
    assert peak < 16 << 20


def test_missing_or_wrong_token_is_401(make_rig: Callable[..., Rig]) -> None:
    """With a bearer token configured, a missing or wrong token is 401 with
    WWW-Authenticate, the right one is accepted."""
    rig = make_rig(token=BearerToken(TOKEN, None, None, "receiver.http.auth.bearer_token"))
    body = process_request([Proc(1, "/bin/a")], now_ms()).SerializeToString()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        status, answer_headers, answer = post(rig.url, body, PROTOBUF, headers)
        assert status == 401
        assert answer_headers["WWW-Authenticate"] == "Bearer"
        assert status_of(answer).code == 16  # UNAUTHENTICATED
    status, _, _ = post(rig.url, body, PROTOBUF, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    assert rig.counted("pathwatch_export_requests_total", outcome="unauthenticated") == 3
    assert rig.store.get(RULE, key_of(Proc(1, "/bin/a"))) is not None


def test_body_without_content_length_is_411(make_rig: Callable[..., Rig]) -> None:
    """A chunked body (no Content-Length) is refused with 411 Length Required."""
    rig = make_rig()
    assert rig.receiver.port
    conn = http.client.HTTPConnection("127.0.0.1", rig.receiver.port, timeout=10)
    try:
        body = process_request([Proc(1, "/bin/a")], now_ms()).SerializeToString()
        conn.request(
            "POST", "/v1/metrics", iter([body]), {"Content-Type": PROTOBUF}, encode_chunked=True
        )
        resp = conn.getresponse()
        assert resp.status == 411
        assert "Content-Length" in status_of(resp.read()).message
    finally:
        conn.close()


def test_other_paths_are_404_and_other_methods_405(make_rig: Callable[..., Rig]) -> None:
    """Only POST /v1/metrics is served: other paths are 404, GET on it is 405 with Allow."""
    rig = make_rig()
    base = rig.url.removesuffix("/v1/metrics")
    assert post(base + "/v1/traces", b"")[0] == 404
    assert post(base + "/", b"", method="GET")[0] == 404
    status, headers, _ = post(rig.url, b"", method="GET")
    assert status == 405
    assert headers["Allow"] == "POST"


# -- retryable refusals -----------------------------------------------------------------


def test_slow_write_is_503_with_retry_after(make_rig: Callable[..., Rig]) -> None:
    """An export whose write is not durable within ack_timeout gets 503 + Retry-After,
    never a 200 it could not honour."""
    rig = make_rig(ack_timeout=0.5)
    rig.store.gate.clear()
    status, headers, answer = post(
        rig.url, process_request([Proc(1, "/a")], now_ms()).SerializeToString()
    )
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert "store unavailable" in status_of(answer).message
    assert rig.counted("pathwatch_export_requests_total", outcome="unavailable") == 1


def test_full_queue_is_429_at_once_with_retry_after(make_rig: Callable[..., Rig]) -> None:
    """With the writer stuck and its queue full, a new export is refused at once with 429 and
    Retry-After (OTLP/HTTP throttling); nothing queues without bound."""
    rig = make_rig(ack_timeout=10.0, max_pending_keys=3)
    rig.store.gate.clear()
    now = now_ms()
    results: list[int] = []

    def stuck(procs: list[Proc]) -> None:
        results.append(post(rig.url, process_request(procs, now).SerializeToString())[0])

    first = threading.Thread(target=stuck, args=([Proc(1, "/a")],), daemon=True)
    first.start()
    assert rig.store.entered.wait(10)
    # 1 key in the stuck write + 2 queued = the bound of 3 keys
    procs = [Proc(i, f"/b{i}") for i in range(2)]
    second = threading.Thread(target=stuck, args=(procs,), daemon=True)
    second.start()
    deadline = time.monotonic() + 5
    while rig.receiver._writer.pending_keys < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    status, headers, _ = post(rig.url, process_request([Proc(9, "/c")], now).SerializeToString())
    assert time.monotonic() - started < 2.0
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    rig.store.gate.set()
    first.join(10)
    second.join(10)
    assert results == [200, 200]  # the queued exports complete once the disk recovers


def test_connections_past_the_cap_get_503(make_rig: Callable[..., Rig]) -> None:
    """With every connection slot busy, another client is answered 503 + Retry-After at once
    by a spare thread instead of waiting for a thread without bound."""
    rig = make_rig(ack_timeout=5.0, max_concurrent=1)
    rig.store.gate.clear()
    body = process_request([Proc(1, "/a")], now_ms()).SerializeToString()
    holder = threading.Thread(target=post, args=(rig.url, body), daemon=True)
    holder.start()
    assert rig.store.entered.wait(10)
    started = time.monotonic()
    status, headers, answer = post(rig.url, body)
    assert time.monotonic() - started < 2.0
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert "maximum of connections" in status_of(answer).message
    rig.store.gate.set()
    holder.join(10)


# -- TLS, lifecycle, real exporters -----------------------------------------------------


def test_tls(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    """With TLS files configured, exports over HTTPS are accepted."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    rig = make_rig(tls=TlsFiles(str(cert_file), str(key_file), None, "receiver.http.tls"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    url = rig.url.replace("http://", "https://")
    body = process_request([Proc(5, "/bin/tls")], now_ms()).SerializeToString()
    assert post(url, body, context=client)[0] == 200
    assert rig.store.get(RULE, key_of(Proc(5, "/bin/tls"))) is not None


def test_lifecycle(make_rig: Callable[..., Rig]) -> None:
    """start logs the bound port; binding a taken port raises OSError naming the address;
    shutdown is safe before start and twice, and bounded with an idle keep-alive open."""
    with structlog.testing.capture_logs() as logs:
        rig = make_rig()
    (line,) = [e for e in logs if e["event"] == "otlp http receiver listening"]
    assert line["port"] == rig.receiver.port and line["listen"] == "127.0.0.1:0"
    taken = f"127.0.0.1:{rig.receiver.port}"
    clash = OtlpHttpReceiver(
        HttpReceiverConfig(listen=taken), rig.decoder, rig.receiver._writer,
        lambda: rig.bounds, Metrics(),
    )  # fmt: skip
    clash.shutdown()
    with pytest.raises(OSError, match=taken):
        clash.start()
    clash.shutdown()
    conn = http.client.HTTPConnection("127.0.0.1", rig.receiver.port or 0, timeout=10)
    conn.request("POST", "/v1/metrics", b"", {"Content-Type": PROTOBUF})
    assert conn.getresponse().status == 200  # an empty request is a success
    started = time.monotonic()
    rig.receiver.shutdown(1)
    rig.receiver.shutdown(1)
    assert time.monotonic() - started < 3.0
    assert not rig.receiver.serving
    conn.close()


def test_sdk_http_exporter_feeds_the_store(make_rig: Callable[..., Rig]) -> None:
    """The OpenTelemetry SDK's own OTLP/HTTP exporter (protobuf, gzip) is understood."""
    exporter_mod: Any = pytest.importorskip(
        "opentelemetry.exporter.otlp.proto.http.metric_exporter",
        reason="opentelemetry-exporter-otlp-proto-http is not installed (a test extra)",
    )
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    rig = make_rig()
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
    exporter = exporter_mod.OTLPMetricExporter(
        endpoint=rig.url, compression=Compression.Gzip, timeout=10
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(resource=resource, metric_readers=[reader])

    def memory(_: CallbackOptions) -> list[Observation]:
        return [Observation(1 << 20)]

    provider.get_meter("pathwatch-test").create_observable_gauge(
        "process.memory.usage", callbacks=[memory], unit="By"
    )
    assert provider.force_flush(10_000)
    provider.shutdown()
    key = ("node-7", "prod", "node-7", "31337", "/dev/shm/.x/kworker", "kworker")
    assert rig.store.get(RULE, key) is not None
    assert rig.counted("pathwatch_export_requests_total", outcome="ok") >= 1
