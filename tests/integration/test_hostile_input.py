"""Hostile and broken OTLP input: the right status or partial success, never a crash."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms
from opentelemetry.proto.common.v1 import common_pb2

from tests.support import EXPORT, Proc, ServiceProcess, process_request

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    s = ServiceProcess(
        tmp_path_factory.mktemp("hostile") / "data",
        {"receiver": {"grpc": {"listen": "127.0.0.1:0", "max_receive_message_size": "4MiB"}}},
    ).start()
    yield s
    s.kill()


def raw_export(svc: ServiceProcess, payload: bytes, gzip: bool = False) -> Any:
    """Send raw bytes as an Export request; returns the response or the grpc.RpcError."""
    compression = grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression
    with grpc.insecure_channel(
        f"127.0.0.1:{svc.grpc_port}",
        compression=compression,
        options=[("grpc.max_send_message_length", 256 << 20)],
    ) as ch:
        call = ch.unary_unary(
            EXPORT, response_deserializer=ms.ExportMetricsServiceResponse.FromString
        )
        try:
            return call(payload, timeout=30)
        except grpc.RpcError as exc:
            return exc


def still_healthy(svc: ServiceProcess) -> None:
    assert svc.proc is not None and svc.proc.poll() is None, "the service died"
    assert svc.api("GET", "/readyz")[0] == 200
    rss_kib = int(next(line.split()[1] for line in
                       Path(f"/proc/{svc.proc.pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:")))  # fmt: skip
    assert rss_kib < 600 * 1024, f"RSS {rss_kib} KiB"


def now_ns() -> int:
    return time.time_ns()


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def ld(field: int, body: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(body)) + body


def test_random_bytes(svc: ServiceProcess) -> None:
    """Random bytes are INVALID_ARGUMENT."""
    for seed in range(5):
        rng = __import__("random").Random(seed)
        result = raw_export(svc, bytes(rng.randrange(256) for _ in range(4096)))
        assert isinstance(result, grpc.RpcError)
        assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
    still_healthy(svc)


def test_truncated_message(svc: ServiceProcess) -> None:
    """A valid request cut short is INVALID_ARGUMENT."""
    data = process_request([Proc(1, "/bin/a")], now_ns() // 1_000_000).SerializeToString()
    result = raw_export(svc, data[: len(data) // 2 + 3])
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
    still_healthy(svc)


def test_wrong_wire_types(svc: ServiceProcess) -> None:
    """Known fields with the wrong wire type are refused or skipped, never a crash."""
    for payload in (varint(1 << 3 | 0) + varint(42), varint(1 << 3 | 5) + b"\0\0\0\0",
                    ld(1, varint(2 << 3 | 1) + b"\0" * 8)):  # fmt: skip
        result = raw_export(svc, payload)
        if isinstance(result, grpc.RpcError):
            assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert result.partial_success.rejected_data_points == 0
    still_healthy(svc)


def test_over_size_limit_plain_and_gzip_bomb(svc: ServiceProcess) -> None:
    """Over the receive limit is RESOURCE_EXHAUSTED, sent plain or as a gzip bomb (a few KiB
    on the wire that would inflate to 64 MiB)."""
    bomb = ld(1, ld(1, ld(1, ld(1, ld(1, b"\0" * (64 << 20))))))
    for gzip in (False, True):
        result = raw_export(svc, bomb, gzip=gzip)
        assert isinstance(result, grpc.RpcError)
        assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_healthy(svc)


def test_many_attributes_and_huge_values(svc: ServiceProcess) -> None:
    """100,000 attributes on one resource and 1 MB values are handled; a 1 MB key field is
    rejected through partial_success and never stored."""
    t = now_ns() // 1_000_000
    req = process_request([Proc(1, "/bin/many")], t)
    req.resource_metrics[0].resource.attributes.extend(
        common_pb2.KeyValue(key=f"a{i}", value=common_pb2.AnyValue(int_value=i))
        for i in range(100_000)
    )
    assert raw_export(svc, req.SerializeToString()).partial_success.rejected_data_points == 0

    req = process_request([Proc(2, "/bin/ppp")], t)
    for kv in req.resource_metrics[0].resource.attributes:
        if kv.key == "process.executable.path":
            kv.value.string_value = "/bin/" + "p" * (1 << 20)
    resp = raw_export(svc, req.SerializeToString())
    assert resp.partial_success.rejected_data_points == 4
    assert "oversized key" in resp.partial_success.error_message
    keys = svc.api("GET", "/api/v1/keys?path=/bin/ppp*")[1]["keys"]
    assert keys == []

    req = process_request([Proc(3, "/bin/bigcmd")], t)
    req.resource_metrics[0].resource.attributes.append(
        common_pb2.KeyValue(key="process.command_line",
                            value=common_pb2.AnyValue(string_value="x" * (1 << 20)))
    )  # fmt: skip
    assert raw_export(svc, req.SerializeToString()).partial_success.rejected_data_points == 0
    still_healthy(svc)


def test_invalid_utf8_and_deep_nesting(svc: ServiceProcess) -> None:
    """A resource with invalid UTF-8 or an AnyValue nested 10,000 deep is not tracked; the
    request is still answered."""
    t = now_ns()
    metric = ld(
        2,
        ld(
            2,
            ld(1, b"process.cpu.time") + ld(5, ld(1, varint(3 << 3 | 1) + t.to_bytes(8, "little"))),
        ),
    )
    bad_utf8 = ld(1, ld(1, ld(1, b"host.name") + ld(2, ld(1, b"\xff\xfe"))))
    deep = b""
    for _ in range(10_000):
        deep = ld(5, ld(1, deep))  # AnyValue.array_value -> ArrayValue.values -> AnyValue
    nested = ld(1, ld(1, ld(1, b"host.name") + ld(2, deep)))
    for resource in (bad_utf8, nested):
        result = raw_export(svc, ld(1, resource + metric))
        if isinstance(result, grpc.RpcError):
            assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
    still_healthy(svc)


def test_zero_negative_far_future_timestamps(svc: ServiceProcess) -> None:
    """'Negative' (a 64-bit wrap), far-future and zero (absent on the wire) timestamps are all
    rejected through partial_success, each named in its message; the request's good points are
    kept and no bad key is stored."""
    t = now_ns() // 1_000_000
    req = process_request([Proc(10, "/bin/good")], t)
    for i, ts_ns in enumerate((0, (1 << 64) - 1, (t + 10 * 365 * 86_400_000) * 1_000_000)):
        bad = process_request([Proc(20 + i, f"/bin/bad{i}")], t)
        for m in bad.resource_metrics[0].scope_metrics[0].metrics:
            for dp in m.sum.data_points:
                dp.time_unix_nano = ts_ns
        req.MergeFrom(bad)
    resp = raw_export(svc, req.SerializeToString())
    assert resp.partial_success.rejected_data_points == 12  # 4 points x 3 processes
    assert "without a timestamp" in resp.partial_success.error_message
    paths = {k["key"]["process.executable.path"]
             for k in svc.api("GET", "/api/v1/keys?path=/bin/*&limit=1000")[1]["keys"]}  # fmt: skip
    assert "/bin/good" in paths and not paths & {"/bin/bad0", "/bin/bad1", "/bin/bad2"}
    still_healthy(svc)


def test_empty_request_and_resource_without_metrics(svc: ServiceProcess) -> None:
    """An empty request and a resource with no metrics are accepted with nothing rejected."""
    assert raw_export(svc, b"").partial_success.rejected_data_points == 0
    req = process_request([Proc(1, "/bin/nometrics")], now_ns() // 1_000_000)
    del req.resource_metrics[0].scope_metrics[:]
    assert raw_export(svc, req.SerializeToString()).partial_success.rejected_data_points == 0
    assert raw_export(svc, os.urandom(0)).partial_success.rejected_data_points == 0
    still_healthy(svc)
