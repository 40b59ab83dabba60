"""Webhook delivery over TLS: a private CA bundle and a client certificate (mTLS)."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.integration.test_delivery import metric, produce_alerts
from tests.support import ServiceProcess, wait_until

pytestmark = pytest.mark.integration


class TlsSink:
    """An HTTPS server that requires a client certificate signed by `ca`."""

    def __init__(self, ca: trustme.CA) -> None:
        self.received: list[tuple[str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                peer = self.connection.getpeercert()  # type: ignore[attr-defined]
                subject = dict(x[0] for x in peer["subject"]) if peer else {}
                outer.received.append((str(subject.get("commonName", "")), body))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        server_cert = ca.issue_cert("127.0.0.1")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_cert.configure_cert(ctx)
        ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, args=(0.1,), daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_sink(ca: trustme.CA) -> Iterator[TlsSink]:
    s = TlsSink(ca)
    yield s
    s.close()


def test_mtls_webhook_with_private_ca(
    tmp_path: Path, ca: trustme.CA, tls_sink: TlsSink, service_factory: type[ServiceProcess]
) -> None:
    """With ca_file, cert_file and key_file the alert is delivered and the receiver sees
    pathwatch's client certificate."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("pathwatch-client", common_name="pathwatch-client")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    sink = {"name": "tls", "type": "webhook", "url": tls_sink.url, "ca_file": str(ca_file),
            "cert_file": str(cert_file), "key_file": str(key_file)}  # fmt: skip
    svc = service_factory(tmp_path / "data", {"sinks": [sink]}).start()
    (alert,) = produce_alerts(svc)
    wait_until(lambda: tls_sink.received, timeout=20)
    (subject, body), *_ = tls_sink.received
    assert subject == "pathwatch-client"
    assert alert["id"].encode() in body


def test_untrusted_server_certificate_is_retried_not_sent(
    tmp_path: Path, tls_sink: TlsSink, service_factory: type[ServiceProcess]
) -> None:
    """Without the private CA the server certificate does not verify: nothing is sent in
    clear, the attempt is counted as a retry and the alert stays queued."""
    sink = {"name": "tls", "type": "webhook", "url": tls_sink.url,
            "retry": {"initial_backoff": "100ms", "max_backoff": "200ms"}}  # fmt: skip
    svc = service_factory(tmp_path / "data", {"sinks": [sink]}).start()
    produce_alerts(svc)
    wait_until(lambda: metric(svc, "pathwatch_deliveries_total", sink="tls", outcome="retried"))
    assert tls_sink.received == []
    assert metric(svc, "pathwatch_outbox_depth", sink="tls") == 1
