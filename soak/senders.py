"""Sender threads: each owns a Fleet and exports its rounds over gRPC, one call at a time.

An export enters the model only once the service acknowledged it (OK without rejected
points). A failed attempt is retried, with backoff, against wherever the service listens now
(it moves to a new port after every restart) until it is acknowledged; only when the harness
gives up at the end (`abandon`) are its keys set aside as uncertain.

The Gate lets the harness quiesce every sender around a tick: `close` stops new exports,
`wait_idle` returns once none is in flight (each retried until acknowledged first).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms

from soak.fleet import Export, Fleet
from soak.model import Model
from soak.otlp import EXPORT

_PERMANENT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED}  # fmt: skip


class Endpoint:
    """Where the service's gRPC receiver listens now (port 0 while it is down)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._port = 0
        self._generation = 0

    def set(self, port: int) -> None:
        with self._lock:
            self._port = port
            self._generation += 1

    def get(self) -> tuple[int, int]:
        with self._lock:
            return self._port, self._generation


class Gate:
    """Open: senders start exports. Closed: they finish the one in flight and wait."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._in_flight = 0

    def enter(self, stop: threading.Event) -> bool:
        """Wait until open, then count one export in flight. False when `stop` is set."""
        with self._cond:
            while not self._open and not stop.is_set():
                self._cond.wait(0.2)
            if stop.is_set():
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open = False

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once no export is in flight, False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True


@dataclass
class SenderStats:
    exports: int = 0  # acknowledged
    history_exports: int = 0  # of which stamped in the past
    resources: int = 0
    points: int = 0
    failed_attempts: Counter[str] = field(default_factory=Counter)  # by gRPC status
    refused: int = 0  # permanent errors: nothing stored, not retried
    untracked_points: int = 0  # partial_success for resources without a key, as designed
    rejected_points: int = 0  # partial_success beyond those: the export is set aside
    abandoned: int = 0  # never acknowledged: keys set aside as uncertain
    latencies: list[float] = field(default_factory=list)  # seconds, acknowledged attempts


class Sender(threading.Thread):
    def __init__(
        self,
        fleet: Fleet,
        endpoint: Endpoint,
        gate: Gate,
        model: Model,
        interval_s: float,
        stop: threading.Event,
        abandon: threading.Event,
        timeout_s: float = 15.0,
    ) -> None:
        super().__init__(name=f"soak-sender-{fleet.index}", daemon=True)
        self.fleet = fleet
        self.endpoint = endpoint
        self.gate = gate
        self.model = model
        self.interval_s = interval_s
        self.stop = stop
        self.abandon = abandon
        self.timeout_s = timeout_s
        self.stats = SenderStats()
        self.error: BaseException | None = None
        self._rng = random.Random(fleet.rng.random())
        self._channel: grpc.Channel | None = None
        self._generation = -1
        self._call: grpc.UnaryUnaryMultiCallable | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                for export in self.fleet.round(time.time_ns() // 1_000_000):
                    if not self.gate.enter(self.stop):
                        return
                    try:
                        self._send(export)
                    finally:
                        self.gate.leave()
                self.stop.wait(max(0.0, started + self.interval_s - time.monotonic()))
        except BaseException as exc:  # reported by the harness, which then fails the run
            self.error = exc
        finally:
            if self._channel is not None:
                self._channel.close()

    def _connect(self, port: int, generation: int) -> grpc.UnaryUnaryMultiCallable:
        if self._call is None or generation != self._generation:
            if self._channel is not None:
                self._channel.close()
            self._channel = grpc.insecure_channel(
                f"127.0.0.1:{port}",
                options=[("grpc.max_send_message_length", 64 << 20), ("grpc.enable_retries", 0)],
                compression=grpc.Compression.Gzip,
            )
            self._call = self._channel.unary_unary(
                EXPORT,
                request_serializer=ms.ExportMetricsServiceRequest.SerializeToString,
                response_deserializer=ms.ExportMetricsServiceResponse.FromString,
            )
            self._generation = generation
        return self._call

    def _send(self, export: Export) -> None:
        """Until acknowledged (or refused, or abandoned), whatever restarts happen meanwhile."""
        stats = self.stats
        attempt = 0
        while True:
            port, generation = self.endpoint.get()
            if port:
                call = self._connect(port, generation)
                started = time.monotonic()
                try:
                    response = call(export.request, timeout=self.timeout_s)
                except grpc.RpcError as exc:
                    code = exc.code()  # type: ignore[attr-defined]
                    stats.failed_attempts[code.name] += 1
                    if code in _PERMANENT:
                        stats.refused += 1
                        return
                else:
                    stats.latencies.append(time.monotonic() - started)
                    rejected = response.partial_success.rejected_data_points
                    if rejected == export.untracked_points:
                        stats.untracked_points += rejected
                        self.model.acknowledge(export.observations)
                    else:
                        stats.rejected_points += rejected
                        self.model.set_aside(export.observations)
                    stats.exports += 1
                    stats.history_exports += export.history
                    stats.resources += export.resources
                    stats.points += export.points
                    return
            if self.abandon.is_set():
                stats.abandoned += 1
                self.model.set_aside(export.observations)
                return
            attempt += 1
            self.abandon.wait(self._rng.uniform(0.05, min(1.0, 0.05 * 2**attempt)))
