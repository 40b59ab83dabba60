"""Receiver worker processes: the OTLP/gRPC receiver on more than one core.

One Python process decodes at most one core's worth of Exports (the GIL). With
`receiver.grpc.processes: N` above 1 the service starts N worker processes. Each runs the same
gRPC receiver (auth, TLS, bounds, fast path) on the same address; the port is shared with
SO_REUSEPORT (gRPC sets it on Linux), so the kernel spreads collector connections over the
workers. A worker decodes with its own Decoder and DurableResources and hands each decoded
request to the service process over a socket pair (receiver/remote.py); the service process
alone has RocksDB open, writes through its single IngestWriter, and answers once the write is
durable, with the DurableResources entries it made. Only then does the worker acknowledge
the Export: no acknowledged observation is lost on kill -9 of any process.

What a worker counts (requests, resources, points, its caches) is sent to the service process
every second and summed into its /metrics (`Metrics.add_source`); counters of a worker that
exited are kept, so totals never go down. Each worker is a supervised component
(`grpc-worker-K`): if it exits it is started again on the same port with the Supervisor's
backoff, counted in pathwatch_component_failures_total; the other workers keep serving
meanwhile. A worker whose service process is gone (its channel closes) fails its pending
Exports UNAVAILABLE and exits.

The OTLP/HTTP receiver stays in the service process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import structlog

from pathwatch.clock import SystemClock
from pathwatch.config.model import Config
from pathwatch.receiver.decode import Decoder, accepted_times
from pathwatch.receiver.grpc_server import OtlpGrpcReceiver
from pathwatch.receiver.remote import Bridge, Channel, ChannelClosed, RemoteSink
from pathwatch.rules import resolve_rules
from pathwatch.store.durable import DurableResources
from pathwatch.store.writer import BatchSink
from pathwatch.supervision import Supervisor
from pathwatch.telemetry.metrics import ForeignSample, Metrics, RetiredSamples, foreign_samples

log = structlog.get_logger(component="receiver")

# The service process's DurableResources when workers serve gRPC (see Service): a group
# commit adds at most a few thousand entries, read back within milliseconds.
WORKERS_SERVICE_DURABLE = 20_000
START_TIMEOUT_S = 30.0  # a worker imports, binds and answers "ready" within this
_EXIT_WAIT_S = 5.0  # after its channel closed, a worker exits within this, or is killed
_METRICS_EVERY_S = 1.0
_WORKER_ENTRY = (
    "import sys; from pathwatch.app.workers import worker_main; "
    "sys.exit(worker_main(int(sys.argv[1])))"
)


class WorkerFailed(Exception):
    """A receiver worker process could not start, or exited while it should serve."""


def with_port(listen: str, port: int) -> str:
    host, _, _ = listen.rpartition(":")
    return f"{host}:{port}"


@dataclass(slots=True)
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    samples: list[ForeignSample] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def name(self) -> str:
        return f"grpc-worker-{self.index}"


class GrpcWorkers:
    """`count` receiver worker processes on `config.receiver.grpc.listen`. Same surface as
    OtlpGrpcReceiver for the service: start() (raises OSError when the port cannot be
    bound), port, serving, shutdown(grace)."""

    def __init__(
        self,
        config: Config,
        sink: BatchSink,
        durable: DurableResources,
        metrics: Metrics,
        supervisor: Supervisor,
    ) -> None:
        self._config = config
        self._sink = sink
        self._durable = durable
        self._supervisor = supervisor
        self._count = config.receiver.grpc.processes
        self._workers = [_Worker(i) for i in range(1, self._count + 1)]
        self._retired = RetiredSamples()
        self._stopping = False
        self._listen = config.receiver.grpc.listen
        self.port: int | None = None
        metrics.add_source(self._samples)

    @property
    def serving(self) -> bool:
        """At least one worker serves (the others may be restarting)."""
        return self.port is not None and any(w.channel is not None for w in self._workers)

    @property
    def serving_count(self) -> int:
        return sum(1 for w in self._workers if w.channel is not None)

    @property
    def count(self) -> int:
        return self._count

    def start(self) -> None:
        """Start every worker: the first binds the configured address (its port, when that
        is 0, is then given to the others); all import in parallel."""
        started = [self._spawn(w) for w in self._workers]
        try:
            first = self._workers[0]
            self.port = self._handshake(first, started[0], self._listen)
            self._listen = with_port(self._listen, self.port)
            for w, channel in zip(self._workers[1:], started[1:], strict=True):
                self._handshake(w, channel, self._listen)
        except BaseException:
            for w in self._workers:
                self._reap(w, 0.0)
            self.port = None
            raise
        for w in self._workers:
            self._supervisor.spawn(w.name, functools.partial(self._serve, w))
        log.info(
            "otlp grpc receiver listening in worker processes",
            listen=self._config.receiver.grpc.listen,
            port=self.port,
            processes=self._count,
            pids=[w.process.pid for w in self._workers if w.process is not None],
        )

    def shutdown(self, grace: float = 5.0) -> None:
        """Workers stop accepting, finish their Exports in flight within `grace` (their
        writes still go through this process), then exit. Safe twice and before start."""
        self._stopping = True
        for w in self._workers:
            if w.channel is not None:
                with contextlib.suppress(ChannelClosed):
                    w.channel.post(("stop", grace))  # never blocks on a stuck worker
        deadline = time.monotonic() + grace + _EXIT_WAIT_S
        for w in self._workers:
            if w.process is None:
                continue
            if not w.stopped.wait(max(0.0, deadline - time.monotonic())):
                self._reap(w, 0.0)
        self.port = None

    # -- one worker --------------------------------------------------------------------------

    def _spawn(self, w: _Worker) -> Channel:
        ours, theirs = socket.socketpair()
        try:
            w.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_ENTRY, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise WorkerFailed(f"cannot start receiver worker {w.index}: {exc}") from exc
        finally:
            theirs.close()
        return Channel(ours)

    def _handshake(self, w: _Worker, channel: Channel, listen: str) -> int:
        """Send the worker its configuration; return the port it serves on."""
        channel.settimeout(START_TIMEOUT_S)
        try:
            channel.send(("init", self._config, listen, w.name))
            reply = channel.recv()
        except (ChannelClosed, TimeoutError) as exc:
            channel.close()
            raise WorkerFailed(f"receiver worker {w.index} did not start: {exc}") from exc
        channel.settimeout(None)
        if reply is None or reply[0] != "ready":
            channel.close()
            problem = reply[1] if reply is not None else "it exited during start-up"
            raise OSError(f"receiver.grpc: worker process {w.index}: {problem}")
        w.channel = channel
        w.stopped.clear()
        return int(reply[1])

    def _serve(self, w: _Worker, stop: threading.Event) -> None:
        """Supervised loop: bridge the worker's channel until it closes; start the worker
        again (on the same port) when it exited while it should serve."""
        if self._stopping or stop.is_set():
            w.stopped.set()
            return
        if w.channel is None:
            try:
                self._handshake(w, self._spawn(w), self._listen)
            except BaseException:
                self._reap(w, 0.0)
                raise
            pid = w.process.pid if w.process is not None else None
            log.info("receiver worker started again", worker=w.name, pid=pid)
        channel = w.channel
        assert channel is not None
        try:
            Bridge(
                channel,
                self._sink,
                self._durable,
                float(self._config.receiver.grpc.ack_timeout),
                lambda samples: setattr(w, "samples", samples),
                w.name,
            ).serve()
        except ChannelClosed as exc:
            log.error("receiver worker channel broken", worker=w.name, error=str(exc))
        finally:
            code = self._reap(w, _EXIT_WAIT_S)
            w.stopped.set()
        if not self._stopping and not stop.is_set():
            raise WorkerFailed(f"receiver worker {w.index} exited (code {code})")

    def _reap(self, w: _Worker, wait_s: float) -> int | None:
        """Close the worker's channel, wait for its exit (kill past `wait_s`), keep its
        counters."""
        channel, w.channel = w.channel, None
        if channel is not None:
            channel.close()
        process = w.process
        code = None
        if process is not None:
            try:
                code = process.wait(wait_s)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait(_EXIT_WAIT_S)
        samples, w.samples = w.samples, []
        self._retired.retire(samples)
        return code

    def _samples(self) -> list[ForeignSample]:
        out = self._retired.samples()
        for w in self._workers:
            out.extend(w.samples)
        return out


# -- the worker process ------------------------------------------------------------------------


def worker_main(fd: int) -> int:
    """Entry of a receiver worker process: FD is its end of the socket pair."""
    from pathwatch.app.cli import limit_malloc_arenas

    limit_malloc_arenas()  # as the service process does, before any thread starts
    # Ctrl-C reaches the whole process group: the service process decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=fd))
    init = channel.recv()
    if init is None or init[0] != "init":
        return 2
    _, config, listen, name = init
    assert isinstance(config, Config)
    from pathwatch.telemetry.logging import configure_logging

    configure_logging(config.log.level, config.log.format)
    wlog = log.bind(worker=name)
    try:
        receiver, sink, metrics = _build(config, listen, channel)
        receiver.start()
    except Exception as exc:  # reported to the service, which names the setting
        channel.send(("failed", str(exc)))
        return 1
    channel.send(("ready", receiver.port))
    done = threading.Event()

    def report() -> None:
        while not done.wait(_METRICS_EVERY_S):
            with contextlib.suppress(ChannelClosed):
                channel.send(("metrics", foreign_samples(metrics.registry)))

    threading.Thread(target=report, name="pathwatch-worker-metrics", daemon=True).start()

    def stop(grace: float) -> None:
        receiver.shutdown(grace)  # Exports in flight still get their answers meanwhile
        done.set()
        with contextlib.suppress(ChannelClosed):
            channel.send(("metrics", foreign_samples(metrics.registry)))
        channel.close_sending()

    stopping: threading.Thread | None = None
    try:
        while True:
            message = channel.recv()
            if message is None:
                break
            if message[0] == "done":
                sink.complete(*message[1:])
            elif message[0] == "stop" and stopping is None:
                stopping = threading.Thread(target=stop, args=(float(message[1]),), daemon=True)
                stopping.start()
    except ChannelClosed as exc:
        wlog.error("channel to the service process broken", error=str(exc))
    sink.close("the pathwatch service process is gone")
    done.set()
    if stopping is None:
        wlog.error("the service process closed the channel; exiting")
        receiver.shutdown(0.5)
        return 1
    stopping.join(START_TIMEOUT_S)
    return 0


def _build(
    config: Config, listen: str, channel: Channel
) -> tuple[OtlpGrpcReceiver, RemoteSink, Metrics]:
    from pathwatch.app.service import bearer_token, owns_cluster, tls_of

    cfg = config.receiver
    rules = resolve_rules(config.rules)
    enabled = [r for r in rules if r.enabled]
    metrics = Metrics()
    durable = DurableResources(cfg.durable_resources)
    decoder = Decoder(
        rules,
        cfg.max_key_field_bytes,
        cfg.resource_cache,
        durable=durable,
        owns_cluster=owns_cluster(config.shard.clusters),
    )
    cache = metrics.cache_entries
    cache.labels(cache="resources").set_function(lambda: decoder.cached_resources)
    cache.labels(cache="durable").set_function(lambda: len(durable))
    sink = RemoteSink(channel, durable)
    clock = SystemClock()
    skew = float(cfg.max_future_skew)
    receiver = OtlpGrpcReceiver(
        dataclasses.replace(cfg.grpc, listen=listen),
        decoder,
        sink,
        lambda: accepted_times(enabled, skew, clock.now_ms()),
        metrics,
        token=bearer_token(cfg.grpc.auth, "receiver.grpc"),
        tls=tls_of(cfg.grpc.tls, "receiver.grpc"),
    )
    return receiver, sink, metrics
