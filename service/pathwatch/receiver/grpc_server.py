"""OtlpGrpcReceiver: the OTLP MetricsService/Export endpoint and the gRPC health service.

Thin by design: decode, hand to the writer, wait (bounded) for durability, map the outcome to a
status the collector's exporter understands. Retryable trouble (queue full, store failing, slow
write, every worker busy) is UNAVAILABLE with RetryInfo; a request that cannot be decoded is
INVALID_ARGUMENT (permanent); points outside the accepted time range are reported through
partial_success.

Bounds. The server is grpc.aio on its own event-loop thread: a stream whose request has not
fully arrived (a slow or half-open client) costs a little memory, never a worker thread, so it
cannot starve other collectors. Each connection may hold `max_concurrent_streams` streams;
clients that ping more often than `keepalive_min_time` are disconnected; connections are closed
after `max_connection_age` (plus a grace for exports in flight) or `max_connection_idle`.
Complete requests are decoded and written on `max_workers` threads with a short queue
(`_QUEUE_PER_WORKER` per worker); past it an export is answered UNAVAILABLE + RetryInfo at once
and counted in pathwatch_receiver_overload_total{receiver="grpc", reason="workers"}.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)

from pathwatch.access import AccessConfigError, BearerToken, TlsFiles
from pathwatch.config.model import GrpcReceiverConfig
from pathwatch.receiver._accounting import count_decoded, write_durably
from pathwatch.receiver._identity import HostFilter, grpc_identity, peer_address, sender_of
from pathwatch.receiver.decode import Decoder, InvalidRequest, TimeBounds, rejection_message
from pathwatch.store.writer import BatchSink
from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="receiver")

SERVICE_NAME = "opentelemetry.proto.collector.metrics.v1.MetricsService"
_RETRY_DELAY_S = 1
_QUEUE_PER_WORKER = 4  # complete requests that may wait for a worker, per worker
_START_TIMEOUT_S = 30.0
_PING_STRIKES = 2  # pings faster than keepalive_min_time tolerated before GOAWAY
_SERVER_PING_S = 60  # the server's own keepalive ping finds dead peers


def _retry_status(message: str, delay_s: int = _RETRY_DELAY_S) -> grpc.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=delay_s)))
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message, details=[detail])
    )


def _credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS credentials that pick up rotated certificate files on new handshakes."""
    cert, key, ca = tls.read()
    watch = tls.watcher()
    watch.changed()

    def fetch() -> Any:
        if not watch.changed():
            return None
        try:
            cert, key, ca = tls.read()
        except AccessConfigError as exc:
            log.error("cannot reload TLS files; keeping the current ones", error=str(exc))
            return None
        log.info("reloaded TLS certificate for the OTLP receiver")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    return grpc.dynamic_ssl_server_credentials(
        grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca),
        fetch,
        require_client_authentication=ca is not None,
    )


def _server_options(config: GrpcReceiverConfig) -> list[tuple[str, int]]:
    def ms(seconds: float) -> int:
        return max(1, int(seconds * 1000))

    return [
        ("grpc.max_receive_message_length", int(config.max_receive_message_size)),
        ("grpc.max_send_message_length", 4 << 20),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        # Keepalive enforcement: a client pinging faster than this gets GOAWAY after a few
        # strikes; an idle collector's own keepalive (no calls in flight) is allowed.
        ("grpc.http2.min_ping_interval_without_data_ms", ms(config.keepalive_min_time)),
        ("grpc.http2.max_ping_strikes", _PING_STRIKES),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", _SERVER_PING_S * 1000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # No connection lives forever: exports in flight get ack_timeout (and a margin) to
        # finish after GOAWAY; the collector reconnects at once.
        ("grpc.max_connection_age_ms", ms(config.max_connection_age)),
        ("grpc.max_connection_age_grace_ms", ms(float(config.ack_timeout) + 5.0)),
        ("grpc.max_connection_idle_ms", ms(config.max_connection_idle)),
    ]


@dataclass(frozen=True, slots=True)
class _Refusal:
    """What a worker decided instead of a response: abort with this code and message, or
    with a retryable status when `status` is set."""

    code: grpc.StatusCode
    message: str
    status: grpc.Status | None = None


class OtlpGrpcReceiver:
    """gRPC server on `config.listen`. start() binds (raises OSError when it cannot);
    shutdown(grace) stops accepting, lets in-flight exports finish for `grace` seconds.
    Both are safe to call twice, and shutdown before start.
    """

    def __init__(
        self,
        config: GrpcReceiverConfig,
        decoder: Decoder,
        writer: BatchSink,
        bounds: Callable[[], TimeBounds],
        metrics: Metrics,
        token: BearerToken | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self._config = config
        self._token = token
        self._tls = tls
        self._decoder = decoder
        self._writer = writer
        self._bounds = bounds
        self._metrics = metrics
        self._bind_hosts = bool(
            tls is not None and tls.client_ca_file and config.tls.require_host_match
        )
        self._capacity = max(1, config.max_workers) * (1 + _QUEUE_PER_WORKER)
        self._admitted = 0  # exports handed to the workers, only touched on the loop thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._grace = 0.0
        self._pool: ThreadPoolExecutor | None = None
        self.port: int | None = None
        if token is not None:
            token.on_reload_failure = lambda: metrics.token_reload_failures.labels(
                listener=token.listener
            ).inc()

    @property
    def serving(self) -> bool:
        return self._thread is not None and self.port is not None

    @property
    def capacity(self) -> int:
        """Exports admitted at once (being decoded and written, or queued for a worker);
        past it an Export is answered UNAVAILABLE + RetryInfo."""
        return self._capacity

    @property
    def in_flight(self) -> int:
        """Exports admitted now (a snapshot)."""
        return self._admitted

    def start(self) -> None:
        if self._thread is not None:
            return
        self._pool = ThreadPoolExecutor(
            max(1, self._config.max_workers), thread_name_prefix="pathwatch-otlp"
        )
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run, args=(loop, started), name="pathwatch-otlp-grpc", daemon=True
        )
        thread.start()
        try:
            port = started.result(_START_TIMEOUT_S)
        except BaseException:
            thread.join(_START_TIMEOUT_S)
            self._pool.shutdown(wait=False)
            self._pool = None
            raise
        self._loop, self._thread, self.port = loop, thread, port
        log.info(
            "otlp grpc receiver listening",
            listen=self._config.listen,
            port=port,
            tls=self._tls is not None,
            mtls=bool(self._tls and self._tls.client_ca_file),
            auth=bool(self._token and self._token.enabled),
            require_host_match=self._bind_hosts,
        )

    def shutdown(self, grace: float = 5.0) -> None:
        """Safe before start and twice."""
        thread, self._thread = self._thread, None
        loop, self._loop = self._loop, None
        if thread is None or loop is None:
            return
        self._grace = grace
        stop = self._stop
        if stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(grace + 2.0)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.port = None

    # -- the event loop thread ----------------------------------------------------------

    def _run(
        self, loop: asyncio.AbstractEventLoop, started: concurrent.futures.Future[int]
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(started))
        except BaseException as exc:  # reported to start() when it happens before serving
            if not started.done():
                started.set_exception(exc)
            else:
                log.exception("otlp grpc receiver stopped unexpectedly")
        finally:
            loop.close()

    async def _serve(self, started: concurrent.futures.Future[int]) -> None:
        self._stop = asyncio.Event()
        server = grpc.aio.server(options=_server_options(self._config))
        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    self._export,
                    request_deserializer=None,  # raw bytes: decoding errors are ours to map
                    response_serializer=ExportMetricsServiceResponse.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        checks = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        listen = self._config.listen
        try:
            if self._tls is None:
                port = server.add_insecure_port(listen)
            else:
                port = server.add_secure_port(listen, _credentials(self._tls))
        except RuntimeError as exc:
            raise OSError(f"receiver.grpc.listen: cannot listen on {listen}: {exc}") from exc
        if not port:
            raise OSError(f"receiver.grpc.listen: cannot listen on {listen}")
        await server.start()
        for name in ("", SERVICE_NAME):
            await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
        started.set_result(port)
        await self._stop.wait()
        await checks.enter_graceful_shutdown()
        await server.stop(self._grace)

    # -- Export ---------------------------------------------------------------------------

    async def _export(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.monotonic()
        metrics = self._metrics
        metrics.export_bytes.observe(len(request))
        try:
            return await self._handle(request, context)
        finally:
            metrics.export_seconds.observe(time.monotonic() - started)

    async def _handle(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        metrics = self._metrics
        if self._token is not None and self._token.enabled:
            presented = next(
                (str(v) for k, v in context.invocation_metadata() or () if k == "authorization"),
                None,
            )
            if not self._token.accepts(presented):
                metrics.export_requests.labels(outcome="unauthenticated").inc()
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
                )
        if self._admitted >= self._capacity or self._pool is None:
            metrics.receiver_overload.labels(receiver="grpc", reason="workers").inc()
            metrics.export_requests.labels(outcome="unavailable").inc()
            await _abort(
                context, _retry_status("pathwatch is overloaded: every export worker is busy")
            )
        identity = grpc_identity(context.auth_context() or {})
        sender = sender_of(identity, peer_address(context.peer() or ""))
        host_filter: HostFilter | None = None
        if self._bind_hosts:
            host_filter = identity.host_filter() if identity is not None else _nobody
        remaining = context.time_remaining()
        deadline = time.monotonic() + (self._config.ack_timeout if remaining is None else remaining)
        self._admitted += 1
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._process, request, sender, host_filter, deadline
            )
        finally:
            self._admitted -= 1
        if isinstance(outcome, _Refusal):
            if outcome.status is not None:
                await _abort(context, outcome.status)
            await context.abort(outcome.code, outcome.message)
        return outcome

    def _process(
        self, request: bytes, sender: str, host_filter: HostFilter | None, deadline: float
    ) -> ExportMetricsServiceResponse | _Refusal:
        """On a worker thread: decode, write durably, account. Blocks up to ack_timeout."""
        metrics = self._metrics
        bounds = self._bounds()
        try:
            result = self._decoder.decode(request, bounds, host_filter=host_filter)
        except InvalidRequest as exc:
            metrics.export_requests.labels(outcome="invalid").inc()
            return _Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        wait = min(float(self._config.ack_timeout), deadline - time.monotonic())
        _, problem = write_durably(self._writer, result, wait, sender=sender)
        if problem:
            metrics.export_requests.labels(outcome="unavailable").inc()
            return _Refusal(grpc.StatusCode.UNAVAILABLE, problem, _retry_status(problem))
        count_decoded(metrics, result)
        response = ExportMetricsServiceResponse()
        if result.points_rejected:
            response.partial_success.rejected_data_points = result.points_rejected
            response.partial_success.error_message = rejection_message(result, bounds)
            metrics.export_requests.labels(outcome="partial").inc()
        else:
            metrics.export_requests.labels(outcome="ok").inc()
        return response


def _nobody(host: str) -> bool:
    """The host filter for a call without a client certificate: no host is its own."""
    return False


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> NoReturn:
    """Abort with a rich status (its details travel in the trailing metadata)."""
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("ServicerContext.abort returned")  # it raises; mypy cannot tell
