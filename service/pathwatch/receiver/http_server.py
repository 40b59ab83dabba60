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

Bounds (the connection handling is in _http_transport): connections that have sent nothing
wait without a thread; at most ``max_concurrent_requests`` are served at once, each by one
thread; past that a few spare threads only answer 503, and past those a connection is closed
unread (the client retries). Headers and body must arrive within ``read_timeout`` of the
request's first byte (408 and closed past it). A body is read only when its declared length is
within the limit, and gzip or deflate is inflated with a hard cap, so a decompression bomb
costs the limit, not its ratio. OTLP/JSON costs about ten times its size to parse: it has its
own, smaller limit (``max_json_message_size``, as sent and inflated) and at most
``max_concurrent_json_decodes`` JSON bodies are read and parsed at once (503 + Retry-After past
it). An idle keep-alive connection gives its slot back after a few seconds, at once when the
server is more than half busy. Every such refusal is counted in
pathwatch_receiver_overload_total{receiver="http"}.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
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

from pathwatch.access import BearerToken, TlsFiles
from pathwatch.config.model import HttpReceiverConfig
from pathwatch.receiver._accounting import count_decoded, write_durably
from pathwatch.receiver._http_transport import BoundedHandler, BoundedHttpServer, split_listen
from pathwatch.receiver._identity import HostFilter, sender_of, tls_identity
from pathwatch.receiver.decode import Decoder, InvalidRequest, TimeBounds, rejection_message
from pathwatch.store.writer import BatchSink
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
_CHUNKED_DRAIN_BYTES = 1 << 20  # at most this much of a refused chunked body is drained
_LINGER_S = 2.0  # after answering early, drain the unread body this long so the client sees it
_RPC_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    404: code_pb2.NOT_FOUND,
    405: code_pb2.UNIMPLEMENTED,
    408: code_pb2.DEADLINE_EXCEEDED,
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


def _inflate(body: bytes, encoding: str, limit: int, setting: str) -> bytes:
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
            raise _Reject(
                413, f"request body exceeds {setting} ({limit} bytes) after decompression"
            )
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


class _Server(BoundedHttpServer):
    receiver: OtlpHttpReceiver


class _Handler(BoundedHandler):
    _unread = 0  # bytes of the current request's body not read (drained before closing)

    @property
    def _srv(self) -> _Server:
        return cast(_Server, self.server)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # outcomes are counted in metrics; per-request lines would flood the log

    def handle_one_request(self) -> None:
        self._unread = 0
        super().handle_one_request()

    def answer_timeout(self) -> None:
        self.close_connection = True
        self._unread = 0
        self._reject(
            _Reject(408, "the request did not arrive within receiver.http.read_timeout", None),
            PROTOBUF,
        )

    def answer_busy(self) -> None:
        self._prepare_body()
        self.close_connection = True
        self._reject(
            _Reject(503, "pathwatch is serving its maximum of connections", None,
                    retry_after=_RETRY_AFTER_S),
            self._answer_media(),
        )  # fmt: skip

    def _answer_media(self) -> str:
        """The encoding of an answer: the request's (OTLP: the response uses the request's
        encoding), else what the client accepts, else protobuf. Also for 404, 405 and 415."""
        for header in ("Content-Type", "Accept"):
            for part in (self.headers.get(header) or "").split(","):
                media = _MEDIA_TYPES.get(part.split(";", 1)[0].strip().lower())
                if media is not None:
                    return media
        return PROTOBUF

    # -- dispatch ------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802 (http.server calls do_<METHOD>)
        if urlsplit(self.path).path != METRICS_PATH:
            self._prepare_body()
            self._reject(_Reject(404, f"no such endpoint; POST OTLP metrics to {METRICS_PATH}",
                                 None), self._answer_media())  # fmt: skip
            return
        self._srv.begin()
        try:
            self._export()
        finally:
            self._srv.end()

    def _other_method(self) -> None:
        self._prepare_body()
        if urlsplit(self.path).path == METRICS_PATH:
            self._reject(
                _Reject(405, f"{self.command} not allowed; use POST", None), self._answer_media()
            )
        else:
            self._reject(_Reject(404, "no such endpoint", None), self._answer_media())

    def do_GET(self) -> None:  # noqa: N802 (http.server calls do_<METHOD>)
        self._other_method()

    def do_HEAD(self) -> None:  # noqa: N802 (http.server calls do_<METHOD>)
        self._other_method()

    def do_PUT(self) -> None:  # noqa: N802 (http.server calls do_<METHOD>)
        self._other_method()

    def do_DELETE(self) -> None:  # noqa: N802 (http.server calls do_<METHOD>)
        self._other_method()

    def do_PATCH(self) -> None:  # noqa: N802 (http.server calls do_<METHOD>)
        self._other_method()

    def do_OPTIONS(self) -> None:  # noqa: N802 (http.server calls do_<METHOD>)
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
            self._reject(reject, media or self._answer_media())
            return
        except (TimeoutError, ConnectionError):
            # The client stalled (answered 408 by the transport) or left mid-body.
            self.close_connection = True
            self._unread = 0
            return
        except Exception:
            log.exception("otlp http export failed")
            self._reject(_Reject(500, "internal error", None), media or self._answer_media())
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
        if media == JSON:
            raw = self._read_json(receiver, length, encoding)
        else:
            raw = _inflate(self._read_body(length), encoding, limit, "the limit")
            metrics.export_bytes.observe(len(raw))
        identity = None
        if isinstance(self.connection, ssl.SSLSocket):
            identity = tls_identity(self.connection.getpeercert())
        host_filter: HostFilter | None = None
        if receiver._bind_hosts:
            host_filter = identity.host_filter() if identity is not None else _nobody
        bounds = receiver._bounds()
        try:
            result = receiver._decoder.decode(raw, bounds, host_filter=host_filter)
        except InvalidRequest as exc:
            raise _Reject(400, str(exc), bad_request=True) from None
        sender = sender_of(identity, str(self.client_address[0]))
        overloaded, problem = write_durably(
            receiver._writer, result, float(config.ack_timeout), sender=sender
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

    def _read_body(self, length: int) -> bytes:
        body = self.rfile.read(length)  # within read_timeout of the request's first byte
        self._unread = 0
        if len(body) < length:
            raise ConnectionError("the client closed the connection mid-body")
        return body

    def _read_json(self, receiver: OtlpHttpReceiver, length: int, encoding: str) -> bytes:
        """An OTLP/JSON body as protobuf bytes, within the JSON bounds: its size as sent and
        inflated, and how many are read and parsed at once (the body is not read when every
        decode slot is taken)."""
        config = receiver._config
        limit = int(config.max_json_message_size)
        setting = f"receiver.http.max_json_message_size ({limit} bytes) for OTLP/JSON"
        if length > limit:
            raise _Reject(
                413,
                f"request body of {length} bytes exceeds {setting}; "
                f"send protobuf ({PROTOBUF}) or smaller batches",
            )
        if not receiver._json_decodes.acquire(blocking=False):
            receiver._metrics.receiver_overload.labels(receiver="http", reason="json_decodes").inc()
            raise _Reject(
                503,
                f"pathwatch is decoding its maximum of {config.max_concurrent_json_decodes} "
                "OTLP/JSON requests",
                "unavailable",
                retry_after=_RETRY_AFTER_S,
            )
        try:
            raw = _inflate(
                self._read_body(length), encoding, limit, "receiver.http.max_json_message_size"
            )
            receiver._metrics.export_bytes.observe(len(raw))
            return _json_to_protobuf(raw)
        finally:
            receiver._json_decodes.release()

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
        self.reader.drain_for(_LINGER_S)
        left = self._unread
        while left > 0:
            try:
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

    def do_POST(self) -> None:  # noqa: N802 (http.server calls do_<METHOD>)
        self.answer_busy()

    def _other_method(self) -> None:
        self.answer_busy()


def _nobody(host: str) -> bool:
    """The host filter for a connection without a client certificate: no host is its own."""
    return False


class OtlpHttpReceiver:
    """OTLP/HTTP server on `config.listen`. start() binds (raises OSError naming the address
    when it cannot); shutdown(grace) stops accepting and lets in-flight exports finish for
    `grace` seconds. Both are safe to call twice, and shutdown before start.
    """

    def __init__(
        self,
        config: HttpReceiverConfig,
        decoder: Decoder,
        writer: BatchSink,
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
        # Identity binding needs a verified client certificate: mTLS (validated by config).
        self._bind_hosts = bool(tls and tls.client_ca_file and config.tls.require_host_match)
        self._json_decodes = threading.BoundedSemaphore(max(1, config.max_concurrent_json_decodes))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        if token is not None:
            token.on_reload_failure = lambda: metrics.token_reload_failures.labels(
                listener=token.listener
            ).inc()

    @property
    def serving(self) -> bool:
        return self._server is not None and self.port is not None

    def start(self) -> None:
        if self._server is not None:
            return
        listen = self._config.listen
        address = split_listen(listen, "receiver.http.listen")
        overload = self._metrics.receiver_overload
        try:
            server = _Server(
                address,
                _Handler,
                _BusyHandler,
                slots=self._config.max_concurrent_requests,
                read_timeout=float(self._config.read_timeout),
                idle_timeout=_IDLE_TIMEOUT_S,
                overload=lambda reason: overload.labels(receiver="http", reason=reason).inc(),
                tls=self._tls,
                name="pathwatch-otlp-http",
            )
            server.receiver = self
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
            require_host_match=self._bind_hosts,
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
