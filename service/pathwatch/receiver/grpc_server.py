"""OtlpGrpcReceiver: the OTLP MetricsService/Export endpoint and the gRPC health service.

Thin by design: decode, hand to the writer, wait (bounded) for durability, map the outcome to a
status the collector's exporter understands. Retryable trouble (queue full, store failing, slow
write) is UNAVAILABLE with RetryInfo; a request that cannot be decoded is INVALID_ARGUMENT
(permanent); points outside the accepted time range are reported through partial_success.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
from pathwatch.receiver.decode import Decoder, InvalidRequest, TimeBounds, rejection_message
from pathwatch.store.writer import IngestWriter
from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="receiver")

SERVICE_NAME = "opentelemetry.proto.collector.metrics.v1.MetricsService"
_RETRY_DELAY_S = 1


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


class OtlpGrpcReceiver:
    """gRPC server on `config.listen`. start() binds (raises OSError when it cannot);
    shutdown(grace) stops accepting, lets in-flight exports finish for `grace` seconds.
    """

    def __init__(
        self,
        config: GrpcReceiverConfig,
        decoder: Decoder,
        writer: IngestWriter,
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
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self.port: int | None = None

    @property
    def serving(self) -> bool:
        return self._server is not None and self.port is not None

    def start(self) -> None:
        if self._server is not None:
            return
        limit = int(self._config.max_receive_message_size)
        server = grpc.server(
            ThreadPoolExecutor(self._config.max_workers, thread_name_prefix="pathwatch-otlp"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", 4 << 20),
            ],
            # Beyond the worker pool, a small queue; past it gRPC answers RESOURCE_EXHAUSTED
            # itself, which the collector retries.
            maximum_concurrent_rpcs=self._config.max_workers * 4,
        )
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
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self._tls is None:
            port = server.add_insecure_port(self._config.listen)
        else:
            port = server.add_secure_port(self._config.listen, _credentials(self._tls))
        if not port:
            raise OSError(f"receiver.grpc.listen: cannot listen on {self._config.listen}")
        server.start()
        self._server = server
        self.port = port
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "otlp grpc receiver listening",
            listen=self._config.listen,
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
        self._health.enter_graceful_shutdown()
        server.stop(grace).wait(grace + 1.0)

    def _export(self, request: bytes, context: grpc.ServicerContext) -> Any:
        started = time.monotonic()
        metrics = self._metrics
        metrics.export_bytes.observe(len(request))
        try:
            return self._handle(request, context)
        finally:
            metrics.export_seconds.observe(time.monotonic() - started)

    def _handle(self, request: bytes, context: grpc.ServicerContext) -> Any:
        metrics = self._metrics
        if self._token is not None and self._token.enabled:
            presented = next(
                (str(v) for k, v in context.invocation_metadata() if k == "authorization"), None
            )
            if not self._token.accepts(presented):
                metrics.export_requests.labels(outcome="unauthenticated").inc()
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        bounds = self._bounds()
        try:
            result = self._decoder.decode(request, bounds)
        except InvalidRequest as exc:
            metrics.export_requests.labels(outcome="invalid").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        remaining = context.time_remaining()
        wait = (
            self._config.ack_timeout
            if remaining is None
            else min(self._config.ack_timeout, remaining)
        )
        _, problem = write_durably(self._writer, result, wait, sender=context.peer() or "")
        if problem:
            metrics.export_requests.labels(outcome="unavailable").inc()
            context.abort_with_status(_retry_status(problem))
        count_decoded(self._metrics, result)
        response = ExportMetricsServiceResponse()
        if result.points_rejected:
            response.partial_success.rejected_data_points = result.points_rejected
            response.partial_success.error_message = rejection_message(result, bounds)
            metrics.export_requests.labels(outcome="partial").inc()
        else:
            metrics.export_requests.labels(outcome="ok").inc()
        return response
