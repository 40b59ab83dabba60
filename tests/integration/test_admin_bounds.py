"""Admin API (8080) bounds: held connections, slow and malformed requests, against the real
service over loopback sockets."""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import ServiceProcess, wait_until

pytestmark = pytest.mark.integration


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def status_of(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def overload(svc: ServiceProcess, reason: str) -> float:
    _, text = svc.api("GET", "/metrics")
    m = re.search(
        rf'pathwatch_receiver_overload_total\{{reason="{reason}",receiver="admin"\}} (\S+)',
        str(text),
    )
    return float(m.group(1)) if m else 0.0


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send `request` and read until the server closes (bounded by the socket timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_idle_connections_do_not_grow_the_thread_count(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """300 connections held open without a byte sent cost no thread: the service's thread
    count stays within http.max_concurrent_requests (+ spares) of its idle count, and
    /readyz still answers 200 (before: one thread per held connection)."""
    svc = service_factory(
        tmp_path / "data", {"http": {"listen": "127.0.0.1:0", "read_timeout": "60s"}}
    ).start()
    assert svc.proc is not None
    assert status_of(svc.http_port, "/readyz") == 200
    idle_threads = threads_of(svc.proc.pid)
    held: list[socket.socket] = []
    try:
        for _ in range(300):
            held.append(socket.create_connection(("127.0.0.1", svc.http_port), timeout=10))
        # Connections are accepted in order: once /readyz (opened last) is answered, all
        # 300 have been accepted.
        assert status_of(svc.http_port, "/readyz") == 200
        grown = threads_of(svc.proc.pid) - idle_threads
    finally:
        for s in held:
            s.close()
    assert grown <= 16 + 4, f"{grown} more threads with 300 idle connections"


def test_slow_requests_are_cut_off_and_counted(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """Requests that never finish their headers take every handler slot only until
    http.read_timeout: meanwhile another client is told 503 + Retry-After (counted, reason
    connections), afterwards /readyz answers 200 and the cut-off requests were answered 408
    and counted (reason read_timeout)."""
    svc = service_factory(
        tmp_path / "data",
        {"http": {"listen": "127.0.0.1:0", "read_timeout": "2s", "max_concurrent_requests": 2}},
    ).start()
    slow = [socket.create_connection(("127.0.0.1", svc.http_port), timeout=10) for _ in range(2)]
    try:
        for s in slow:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
        busy: list[int] = []

        def refused() -> bool:
            busy.append(status_of(svc.http_port, "/healthz"))
            return busy[-1] == 503

        wait_until(refused, timeout=10, interval=0.05)
        answers = [s.recv(65536) for s in slow]  # the server answers and closes at the deadline
    finally:
        for s in slow:
            s.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
    wait_until(lambda: status_of(svc.http_port, "/readyz") == 200, timeout=10)
    assert overload(svc, "connections") >= 1
    assert overload(svc, "read_timeout") >= 2


@pytest.mark.parametrize("value", ["abc", "-5", "1e3"])
def test_malformed_content_length_is_400_without_a_traceback(
    tmp_path: Path, service_factory: type[ServiceProcess], value: str
) -> None:
    """A malformed Content-Length is answered 400 with a JSON error naming it, and nothing is
    logged as an exception (before: a traceback and no response)."""
    svc = service_factory(tmp_path / "data").start()
    answer = raw_exchange(
        svc.http_port,
        f"POST /api/v1/deadletters/redrive HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {value}\r\n\r\n".encode(),
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert "Content-Length" in json.loads(body)["error"]
    assert status_of(svc.http_port, "/healthz") == 200
    # The log is ordered: once the /healthz request's line is in, so is anything before it.
    wait_until(lambda: any("GET /healthz" in line for line in svc.lines), timeout=10)
    assert not any("Traceback" in line or '"exception"' in line for line in svc.lines)
