"""OtlpHttpReceiver: OTLP/HTTP metrics, ``POST /v1/metrics``, binary protobuf or OTLP/JSON.

The same pipeline as the gRPC receiver, behind the OTLP/HTTP rules: decode, hand to the writer,
wait (bounded by ``ack_timeout``) for durability, answer. A JSON body is parsed into an
ExportMetricsServiceRequest and re-serialised, so it goes through the very same Decoder path
as protobuf and means exactly the same thing. The answer uses the request's encoding:

- 200 with an ExportMetricsServiceResponse; ``partial_success`` when points were rejected;
- permanent (the client drops the data): 400 undecodable body (a google.rpc.Status with a
  BadRequest), 401 missing or wrong bearer token, 411 no Content-Length, 413 body larger than
  ``max_receive_message_size`` before or after decompression, 415 other content types or
  encodings, 404 other paths, 405 other methods on /v1/metrics;
- retryable, with ``Retry-After``: 429 when the write queue is full, 503 when the store fails,
  the write is not durable within ``ack_timeout``, or every connection slot is taken.

Bounds: at most ``max_concurrent_requests`` connections are served at once, each by one thread;
past that a few spare threads only answer 503, and past those a connection is closed unread (the
client retries). A body is read only when its declared length is within the limit, and gzip or
deflate is inflated with a hard cap, so a decompression bomb costs the limit, not its ratio. An
idle keep-alive connection gives its slot back after a few seconds, at once when the server is
more than half busy.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

import structlog
from google.protobuf import any_pb2, duration_pb2, json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from pathwatch.access import AccessConfigError, BearerToken, TlsFiles
from pathwatch.config.model import HttpReceiverConfig
from pathwatch.receiver._accounting import count_decoded, write_durably
from pathwatch.receiver.decode import Decoder, InvalidRequest, TimeBounds, rejection_message
from pathwatch.store.writer import IngestWriter
from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="receiver")

METRICS_PATH = "/v1/metrics"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_MEDIA_TYPES = {PROTOBUF: PROTOBUF, "application/protobuf": PROTOBUF, JSON: JSON}
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ENCODINGS = {"identity": 0, "gzip": _GZIP_WBITS, "x-gzip": _GZIP_WBITS, "deflate": zlib.MAX_WBITS}
_RETRY_AFTER_S = 1
_IDLE_TIMEOUT_S = 5.0  # a keep-alive connection waiting for its next request holds a slot
_IO_TIMEOUT_S = 30.0  # longest stall while a body is read or a response written
_HANDSHAKE_TIMEOUT_S = 10.0
_CHUNKED_DRAIN_BYTES = 1 << 20  # at most this much of a refused chunked body is drained
_LINGER_S = 2.0  # after answering early, drain the unread body this long so the client sees it
_SPARE_THREADS = 4  # past every slot, threads that only answer 503
_RPC_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    404: code_pb2.NOT_FOUND,
    405: code_pb2.UNIMPLEMENTED,
    411: code_pb2.INVALID_ARGUMENT,
    413: code_pb2.RESOURCE_EXHAUSTED,
    415: code_pb2.INVALID_ARGUMENT,
    429: code_pb2.RESOURCE_EXHAUSTED,
    500: code_pb2.INTERNAL,
    503: code_pb2.UNAVAILABLE,
}


class _Reject(Exception):
    """An answer other than 200: HTTP status, message, metric outcome (None: not counted)."""

    def __init__(
        self,
        status: int,
        message: str,
        outcome: str | None = "invalid",
        *,
        retry_after: int | None = None,
        bad_request: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.outcome = outcome
        self.retry_after = retry_after
        self.bad_request = bad_request


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decoded per Content-Encoding, never more than `limit` bytes of output produced
    (one byte more proves it too large). Concatenated gzip members are read as one stream."""
    wbits = _ENCODINGS[encoding]
    if not wbits:
        return body
    parts: list[bytes] = []
    size = 0
    data = body
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            chunk = inflater.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            raise _Reject(
                400, f"cannot decompress the {encoding} body: {exc}", bad_request=True
            ) from None
        size += len(chunk)
        if size > limit:
            raise _Reject(413, f"request body exceeds {limit} bytes after decompression")
        if not inflater.eof:
            raise _Reject(400, f"the {encoding} body is truncated", bad_request=True)
        parts.append(chunk)
        data = inflater.unused_data
        if not data or wbits != _GZIP_WBITS:
            break
    return b"".join(parts)


def _json_to_protobuf(raw: bytes) -> bytes:
    """OTLP/JSON (lowerCamelCase keys, unknown fields ignored) to protobuf bytes."""
    if raw.lstrip()[:1] != b"{":
        raise _Reject(400, "an OTLP/JSON request must be a JSON object", bad_request=True)
    request = ExportMetricsServiceRequest()
    try:
        json_format.Parse(raw, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, RecursionError) as exc:
        raise _Reject(
            400, f"cannot decode OTLP/JSON ExportMetricsServiceRequest: {exc}", bad_request=True
        ) from None
    return request.SerializeToString()


def _encode(message: Message, media: str) -> bytes:
    if media == JSON:
        return json.dumps(json_format.MessageToDict(message), separators=(",", ":")).encode()
    return message.SerializeToString()


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise OSError(f"receiver.http.listen: {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class _Server(ThreadingHTTPServer):
    """Thread per connection, bounded by a semaphore; TLS per connection with the current
    certificate (re-read when its files change); tracks connections for a bounded shutdown."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        receiver: OtlpHttpReceiver,
        slots: int,
        tls: TlsFiles | None,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.receiver = receiver
        self.capacity = max(1, slots)
        self._slots = threading.BoundedSemaphore(self.capacity)
        self._spare = threading.BoundedSemaphore(_SPARE_THREADS)
        self._cond = threading.Condition()
        self._open: set[Any] = set()
        self._inflight = 0
        self.closing = False
        self._tls = tls
        self._context: ssl.SSLContext | None = None
        self._watch: Any = None
        if self._tls is not None:
            self._watch = self._tls.watcher()
            self._watch.changed()
            self._context = self._tls.server_context()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a DNS lookup); nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "pathwatch", self.server_address[1]

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self._tls is None:
            return sock, addr
        if self._watch.changed():
            try:
                self._context = self._tls.server_context()
                log.info("reloaded TLS certificate for the OTLP/HTTP receiver")
            except AccessConfigError as exc:
                log.error("cannot reload TLS files; keeping the current ones", error=str(exc))
        assert self._context is not None
        return self._context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), addr

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._slots.acquire(blocking=False):
            handler: type[_Handler] = _Handler
            release = self._slots.release
        elif self._spare.acquire(blocking=False):
            handler, release = _BusyHandler, self._spare.release
        else:
            self.shutdown_request(request)  # past every bound: a closed connection, retried
            return
        try:
            threading.Thread(
                target=self._serve,
                args=(request, client_address, handler, release),
                name="pathwatch-otlp-http",
                daemon=True,
            ).start()
        except RuntimeError:  # no thread to be had: same as past every bound
            release()
            self.shutdown_request(request)

    def _serve(
        self, request: Any, client_address: Any, handler: type[_Handler], release: Callable[[], Any]
    ) -> None:
        with self._cond:
            self._open.add(request)
        try:
            if isinstance(request, ssl.SSLSocket):
                request.settimeout(_HANDSHAKE_TIMEOUT_S)
                request.do_handshake()
            handler(request, client_address, self)
        except (OSError, ssl.SSLError) as exc:
            log.debug("otlp http connection ended", error=str(exc))
        except Exception:
            log.exception("otlp http connection failed")
        finally:
            with self._cond:
                self._open.discard(request)
            self.shutdown_request(request)
            release()

    def keep_alive(self) -> bool:
        """Whether an answered connection may wait for another request: not when shutting
        down, nor when more than half the slots are taken (idle clients must not hog them)."""
        return not self.closing and len(self._open) <= self.capacity // 2

    def begin(self) -> None:
        with self._cond:
            self._inflight += 1

    def end(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight exports finish for up to `grace` seconds, then cut
        every connection still open (idle keep-alives, or exports past the grace)."""
        self.closing = True
        self.shutdown()
        deadline = time.monotonic() + grace
        with self._cond:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            still_open = list(self._open)
        for sock in still_open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pathwatch"
    timeout = _IDLE_TIMEOUT_S
    _unread = 0  # bytes of the current request's body not read (drained before closing)

    @property
    def _srv(self) -> _Server:
        return cast(_Server, self.server)

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_message(self, format: str, *args: Any) -> None:
        pass  # outcomes are counted in metrics; per-request lines would flood the log

    def handle_one_request(self) -> None:
        self._unread = 0
        self.connection.settimeout(_IDLE_TIMEOUT_S)
        super().handle_one_request()

    # -- dispatch ------------------------------------------------------------------------

    def do_POST(self) -> None:
        if urlsplit(self.path).path != METRICS_PATH:
            self._prepare_body()
            self._reject(_Reject(404, f"no such endpoint; POST OTLP metrics to {METRICS_PATH}",
                                 None), PROTOBUF)  # fmt: skip
            return
        self._srv.begin()
        try:
            self._export()
        finally:
            self._srv.end()

    def _other_method(self) -> None:
        self._prepare_body()
        if urlsplit(self.path).path == METRICS_PATH:
            self._reject(_Reject(405, f"{self.command} not allowed; use POST", None), PROTOBUF)
        else:
            self._reject(_Reject(404, "no such endpoint", None), PROTOBUF)

    def do_GET(self) -> None:
        self._other_method()

    def do_HEAD(self) -> None:
        self._other_method()

    def do_PUT(self) -> None:
        self._other_method()

    def do_DELETE(self) -> None:
        self._other_method()

    def do_PATCH(self) -> None:
        self._other_method()

    def do_OPTIONS(self) -> None:
        self._other_method()

    # -- export --------------------------------------------------------------------------

    def _prepare_body(self) -> int | None:
        """The declared body length (None when absent, -1 when malformed); remembers what is
        unread so that an early answer can drain it."""
        if self.headers.get("Transfer-Encoding"):
            # Chunked bodies are refused (411); what the client is still sending is drained
            # (bounded in time and size) so it reads the answer, not a reset.
            self.close_connection = True
            self._unread = _CHUNKED_DRAIN_BYTES
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return -1
        self._unread = length
        return length

    def _export(self) -> None:
        receiver = self._srv.receiver
        metrics = receiver._metrics
        media = _MEDIA_TYPES.get(
            (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        )
        started = time.monotonic()
        length = self._prepare_body()
        try:
            body = self._handle(receiver, media, length)
        except _Reject as reject:
            if reject.outcome is not None:
                metrics.export_requests.labels(outcome=reject.outcome).inc()
            self._reject(reject, media or PROTOBUF)
            return
        except (TimeoutError, ConnectionError):
            self.close_connection = True  # the client stalled or left mid-body: no answer
            return
        except Exception:
            log.exception("otlp http export failed")
            self._reject(_Reject(500, "internal error", None), media or PROTOBUF)
            return
        finally:
            metrics.export_seconds.observe(time.monotonic() - started)
        self._send(200, body, media or PROTOBUF)

    def _handle(self, receiver: OtlpHttpReceiver, media: str | None, length: int | None) -> bytes:
        config, metrics = receiver._config, receiver._metrics
        token = receiver._token
        if (
            token is not None
            and token.enabled
            and not token.accepts(self.headers.get("Authorization"))
        ):
            raise _Reject(401, "missing or invalid bearer token", "unauthenticated")
        if media is None:
            raise _Reject(
                415,
                f"unsupported Content-Type {self.headers.get('Content-Type')!r}; "
                f"send {PROTOBUF} or {JSON}",
            )
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in _ENCODINGS:
            raise _Reject(415, f"unsupported Content-Encoding {encoding!r}; send gzip or none")
        if length is None:
            raise _Reject(411, "Content-Length is required (chunked bodies are not accepted)")
        if length < 0:
            raise _Reject(400, "malformed Content-Length", bad_request=True)
        limit = int(config.max_receive_message_size)
        if length > limit:
            raise _Reject(413, f"request body of {length} bytes exceeds the limit of {limit}")
        self.connection.settimeout(_IO_TIMEOUT_S)
        body = self.rfile.read(length)
        self._unread = 0
        if len(body) < length:
            raise ConnectionError("the client closed the connection mid-body")
        raw = _inflate(body, encoding, limit)
        metrics.export_bytes.observe(len(raw))
        if media == JSON:
            raw = _json_to_protobuf(raw)
        bounds = receiver._bounds()
        try:
            result = receiver._decoder.decode(raw, bounds)
        except InvalidRequest as exc:
            raise _Reject(400, str(exc), bad_request=True) from None
        overloaded, problem = write_durably(
            receiver._writer, result, float(config.ack_timeout), sender=str(self.client_address[0])
        )
        if problem:
            status = 429 if overloaded else 503
            raise _Reject(status, problem, "unavailable", retry_after=_RETRY_AFTER_S)
        count_decoded(metrics, result)
        response = ExportMetricsServiceResponse()
        if result.points_rejected:
            response.partial_success.rejected_data_points = result.points_rejected
            response.partial_success.error_message = rejection_message(result, bounds)
            metrics.export_requests.labels(outcome="partial").inc()
        else:
            metrics.export_requests.labels(outcome="ok").inc()
        return _encode(response, media)

    # -- answers -------------------------------------------------------------------------

    def _reject(self, reject: _Reject, media: str) -> None:
        status = status_pb2.Status(code=_RPC_CODES.get(reject.status, 0), message=reject.message)
        headers: list[tuple[str, str]] = []
        if reject.retry_after is not None:
            detail = any_pb2.Any()
            detail.Pack(
                error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(seconds=reject.retry_after)
                )
            )
            status.details.append(detail)
            headers.append(("Retry-After", str(reject.retry_after)))
        if reject.bad_request:
            detail = any_pb2.Any()
            detail.Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="body", description=reject.message
                        )
                    ]
                )
            )
            status.details.append(detail)
        if reject.status == 401:
            headers.append(("WWW-Authenticate", "Bearer"))
        elif reject.status == 405:
            headers.append(("Allow", "POST"))
        self._send(reject.status, _encode(status, media), media, headers)

    def _send(
        self, status: int, body: bytes, media: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.connection.settimeout(_IO_TIMEOUT_S)
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers or ():
            self.send_header(name, value)
        if self._unread or self.close_connection or not self._srv.keep_alive():
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self._unread:
            self._linger()

    def _linger(self) -> None:
        """After answering before the body was read: half-close, then read and drop what the
        client is still sending (bounded in time), so it reads the answer instead of a reset."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _LINGER_S
        left = self._unread
        while left > 0 and (wait := deadline - time.monotonic()) > 0:
            try:
                self.connection.settimeout(wait)
                chunk = self.rfile.read1(min(left, 1 << 16))
            except (OSError, ValueError):
                break
            if not chunk:
                break
            left -= len(chunk)
        self._unread = 0
        self.close_connection = True


class _BusyHandler(_Handler):
    """Runs on a spare thread when every slot is taken: answers 503 and closes."""

    def do_POST(self) -> None:
        self._prepare_body()
        self.close_connection = True
        self._reject(
            _Reject(503, "pathwatch is serving its maximum of connections", None,
                    retry_after=_RETRY_AFTER_S),
            PROTOBUF,
        )  # fmt: skip

    def _other_method(self) -> None:
        self.do_POST()


class OtlpHttpReceiver:
    """OTLP/HTTP server on `config.listen`. start() binds (raises OSError naming the address
    when it cannot); shutdown(grace) stops accepting and lets in-flight exports finish for
    `grace` seconds. Both are safe to call twice, and shutdown before start.
    """

    def __init__(
        self,
        config: HttpReceiverConfig,
        decoder: Decoder,
        writer: IngestWriter,
        bounds: Callable[[], TimeBounds],
        metrics: Metrics,
        token: BearerToken | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self._config = config
        self._decoder = decoder
        self._writer = writer
        self._bounds = bounds
        self._metrics = metrics
        self._token = token
        self._tls = tls
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def serving(self) -> bool:
        return self._server is not None and self.port is not None

    def start(self) -> None:
        if self._server is not None:
            return
        listen = self._config.listen
        address = _split_listen(listen)
        try:
            server = _Server(address, self, self._config.max_concurrent_requests, self._tls)
        except OSError as exc:
            raise OSError(
                f"receiver.http.listen: cannot listen on {listen}: {exc.strerror or exc}"
            ) from exc
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="pathwatch-otlp-http-accept",
            daemon=True,
        )
        self._thread.start()
        self._server = server
        port = server.server_address[1]
        self.port = port
        log.info(
            "otlp http receiver listening",
            listen=listen,
            port=port,
            tls=self._tls is not None,
            mtls=bool(self._tls and self._tls.client_ca_file),
            auth=bool(self._token and self._token.enabled),
        )

    def shutdown(self, grace: float = 5.0) -> None:
        """Safe before start and twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop(grace)
        if self._thread is not None:
            self._thread.join(grace + 1.0)
            self._thread = None
