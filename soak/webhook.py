"""WebhookReceiver: the harness's own sink, a real HTTP server on an ephemeral loopback port.

Records every POST's `webhook-id` with the time and the status answered, checks the Standard
Webhooks signature, and answers 503 to a seeded share of requests (so retries are part of the
run), 200 to the rest. An id counts as delivered once it was answered 200.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookReceiver:
    def __init__(self, secret: bytes, failure_rate: float, seed: int) -> None:
        self.secret = secret
        self.failure_rate = failure_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.accepted: dict[str, list[float]] = {}  # id -> monotonic times answered 200
        self.failed = 0  # answered 503
        self.bad_signatures = 0
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if len(body) < length:
                    return  # the sender died mid-request (kill -9): nothing was delivered
                status = outer._record(
                    self.headers.get("webhook-id", ""),
                    self.headers.get("webhook-timestamp", ""),
                    self.headers.get("webhook-signature", ""),
                    body,
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.2,), name="soak-webhook", daemon=True
        )
        self._thread.start()

    def _record(self, alert_id: str, timestamp: str, signatures: str, body: bytes) -> int:
        signed = f"{alert_id}.{timestamp}.".encode() + body
        expected = base64.b64encode(hmac.new(self.secret, signed, hashlib.sha256).digest())
        valid = any(
            hmac.compare_digest(s.removeprefix("v1,").encode(), expected)
            for s in signatures.split()
        )
        with self._lock:
            self.requests += 1
            if not valid:
                self.bad_signatures += 1
            if self._rng.random() < self.failure_rate:
                self.failed += 1
                return 503
            self.accepted.setdefault(alert_id, []).append(time.monotonic())
            return 200

    def delivered(self) -> dict[str, list[float]]:
        with self._lock:
            return {k: list(v) for k, v in self.accepted.items()}

    def count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection reset by pathwatch's kill -9 is expected here, not worth a traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)
