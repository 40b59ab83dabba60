"""OTLP/HTTP answers errors in the request's encoding (JSON for JSON), 404 and 405 included."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServiceProcess

JSON = "application/json"


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[ServiceProcess]:
    service = ServiceProcess(tmp_path / "data").start()
    try:
        yield service
    finally:
        service.stop()


def _request(
    svc: ServiceProcess, method: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", svc.otlp_http_port, timeout=10)
    try:
        conn.request(method, path, body, headers)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/v1/traces", {"Content-Type": JSON}, 404),
        ("GET", "/v1/metrics", {"Accept": JSON}, 405),
        ("POST", "/v1/metrics", {"Content-Type": "text/plain", "Accept": JSON}, 415),
        ("POST", "/v1/metrics", {"Content-Type": JSON, "Content-Encoding": "br"}, 415),
        ("POST", "/v1/metrics", {"Content-Type": JSON}, 400),
    ],
)
def test_json_clients_get_json_errors(
    svc: ServiceProcess, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    """A client speaking JSON gets a JSON Status (code and message), whatever went wrong."""
    got, content_type, body = _request(svc, method, path, b"{not json", headers)
    assert got == status
    assert content_type == JSON
    decoded = json.loads(body)
    assert decoded["message"]


def test_protobuf_clients_still_get_protobuf_errors(svc: ServiceProcess) -> None:
    """Without a JSON hint the answer stays binary protobuf, as the OTLP default."""
    got, content_type, _ = _request(svc, "POST", "/v1/traces", b"", {})
    assert got == 404 and content_type == "application/x-protobuf"
