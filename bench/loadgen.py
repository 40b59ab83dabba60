"""The load generator: a separate process driving pathwatch over real gRPC.

Run as ``python -m bench.loadgen JOB_JSON`` (the orchestrator pins it to its own core). It sends
Export requests from `concurrency` concurrent calls spread over `channels` connections, gzip
compressed as the collector's otlp exporter does, and writes JSON lines to stdout: ``progress``
events about once a second and one final ``result``. UNAVAILABLE and RESOURCE_EXHAUSTED are
retried after a short pause, as a collector would, and counted; any other error ends the run
with exit code 1 and an ``error`` line.

Three jobs:

- ``fleet``: the steady-state fleet (bench.workload.Fleet). Every node's first scrape primes the
  store with the fleet's keys; then `warmup_s`, then at least `duration_s` of measurement:
  acknowledged resources and data points per second, per-Export latency, and the CPU time the
  service and this process used in that window. The window spans whole simulated minutes of
  the fleet (nodes x 60 s / interval acknowledged requests each): a process's first scrape in
  a minute costs the service several times more than the next five, so a window of any other
  length over- or under-weights them. With `extra_s`, the load goes on that long after the
  window (an ``extra`` event marks it): time for a profiler that would perturb the figures.
- ``history``: every request of one stage of bench.workload.HistoryPlan, once.
- ``probe``: a steady exporter, one node of the fleet (bench.workload.Fleet) scraping on a
  fixed period (`period_s`) with one Export in flight, for `duration_s` in each of `windows`
  (named, in order; a ``window`` event marks each start). The node's first scrape (all its
  processes new) is sent first and not measured. The result lists every acknowledged Export
  as [window, start, seconds] with `time.monotonic()` starts (system-wide on Linux), so the
  orchestrator can tell which ones overlapped what it was doing meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)

from bench import procstat
from bench.otlp import Export, check_export
from bench.workload import Fleet, FleetSpec, HistoryPlan, HistorySpec

EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_MAX_FUTURE_MS = 4 * 60_000  # pathwatch rejects points more than 5 minutes ahead


@dataclass(frozen=True)
class Job:
    target: str
    source: str  # "fleet", "history" or "probe"
    spec: dict[str, Any]
    stage: int = 0
    concurrency: int = 8
    channels: int = 4
    warmup_s: float = 3.0
    duration_s: float = 20.0
    extra_s: float = 0.0  # fleet: load after the measurement (for a profiler), not measured
    service_pid: int | None = None
    progress_s: float = 1.0
    timeout_s: float = 30.0  # per Export call
    reach_timeout_s: float = 250.0  # fleet: longest wait for a phase's acknowledgements
    period_s: float = 0.05  # probe: one Export started every period (none in flight before)
    windows: tuple[str, ...] = ()  # probe: measured windows, `duration_s` each
    metrics_url: str = ""  # probe: the service's /metrics, to wait until the prime is published
    sticky: bool = True  # fleet: each node's scrapes on one connection, as its collector does


@dataclass
class Tally:
    """What the service acknowledged so far."""

    requests: int = 0
    resources: int = 0
    points: int = 0
    keys: int = 0
    retries: int = 0
    partial: int = 0  # acknowledgements that rejected data points (partial_success)
    done: list[tuple[float, float, int, int]] = field(default_factory=list)  # end, latency, r, p


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class Driver:
    """Sends exports from an iterator until it ends or `stop_at` (monotonic) passes."""

    def __init__(self, job: Job, exports: Iterator[Export]) -> None:
        self.job = job
        self.exports = exports
        self.tally = Tally()
        self.stop_at = float("inf")
        self.phase = "load"
        self.error: str | None = None

    async def run(self) -> None:
        options = [
            ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel
            ("grpc.max_send_message_length", 64 << 20),
        ]
        channels = [
            grpc.aio.insecure_channel(
                self.job.target, options=options, compression=grpc.Compression.Gzip
            )
            for _ in range(max(1, self.job.channels))
        ]
        try:
            calls = [
                ch.unary_unary(
                    EXPORT_METHOD,
                    request_serializer=None,  # payloads are serialized already
                    response_deserializer=ExportMetricsServiceResponse.FromString,
                )
                for ch in channels
            ]
            if self.job.source == "fleet" and self.job.sticky:
                await self._sticky(calls)
            else:
                workers = [
                    asyncio.create_task(self._worker(calls[i % len(calls)], self._next))
                    for i in range(self.job.concurrency)
                ]
                await asyncio.gather(*workers)
        finally:
            for ch in channels:
                await ch.close()

    async def _next(self) -> Export | None:
        return next(self.exports, None)

    async def _sticky(self, calls: list[Any]) -> None:
        """A node's scrapes always on the same connection, as its collector keeps one: with
        receiver worker processes, one worker then sees every scrape of a node. At most
        `concurrency` Exports in flight over all connections."""
        per_channel = -(-self.job.concurrency // len(calls))
        # Room for a few scrapes per connection, so one slow call does not hold up the rest
        queues: list[asyncio.Queue[Export | None]] = [
            asyncio.Queue(maxsize=per_channel + 3) for _ in calls
        ]
        gate = asyncio.Semaphore(self.job.concurrency)

        async def feed() -> None:
            for export in self.exports:
                await queues[export.node % len(queues)].put(export)
            for q in queues:
                for _ in range(per_channel):
                    await q.put(None)

        def taker(q: asyncio.Queue[Export | None]) -> Callable[[], Awaitable[Export | None]]:
            async def take() -> Export | None:
                # Bounded: once the run ends, a worker whose queue the feeder no longer
                # fills (it waits on another, full one) must still return.
                while self.error is None and time.monotonic() < self.stop_at:
                    try:
                        return await asyncio.wait_for(q.get(), 0.2)
                    except TimeoutError:
                        continue
                return None

            return take

        feeder = asyncio.create_task(feed())
        workers = [
            asyncio.create_task(self._worker(call, taker(q), gate))
            for call, q in zip(calls, queues, strict=True)
            for _ in range(per_channel)
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            feeder.cancel()

    async def _worker(
        self,
        call: Any,
        take: Callable[[], Awaitable[Export | None]],
        gate: asyncio.Semaphore | None = None,
    ) -> None:
        tally = self.tally
        while self.error is None and time.monotonic() < self.stop_at:
            export = await take()
            if export is None:
                return
            if export.time_ms > time.time() * 1000 + _MAX_FUTURE_MS:
                self.error = (
                    "simulated time ran ahead of the clock: start the fleet earlier or "
                    "shorten the run"
                )
                return
            while True:
                if gate is not None:
                    await gate.acquire()
                started = time.monotonic()
                try:
                    response = await call(export.payload, timeout=self.job.timeout_s)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in _RETRYABLE:
                        if self.error is not None or time.monotonic() >= self.stop_at:
                            return
                        tally.retries += 1
                        await asyncio.sleep(0.05)
                        continue
                    self.error = f"Export failed: {exc.code().name}: {exc.details()}"
                    return
                finally:
                    if gate is not None:
                        gate.release()
                break
            ended = time.monotonic()
            tally.requests += 1
            tally.resources += export.resources
            tally.points += export.points
            tally.keys += export.new_keys
            if response.partial_success.rejected_data_points:
                tally.partial += 1
            tally.done.append((ended, ended - started, export.resources, export.points))


async def _progress(driver: Driver, every: float, total_keys: int | None) -> None:
    started = time.monotonic()
    last_t, last_r = started, 0
    while True:
        await asyncio.sleep(every)
        now, t = time.monotonic(), driver.tally
        emit(
            "progress",
            phase=driver.phase,
            elapsed=round(now - started, 2),
            resources=t.resources,
            keys=t.keys,
            total_keys=total_keys,
            rate=round((t.resources - last_r) / max(1e-9, now - last_t)),
        )
        last_t, last_r = now, t.resources


def _summary(tally: Tally, start: float, end: float) -> dict[str, Any]:
    """Rates and latency of the exports acknowledged in [start, end]."""
    window = [d for d in tally.done if start <= d[0] <= end]
    seconds = max(1e-9, end - start)
    latencies = sorted(d[1] for d in window)
    return {
        "seconds": round(seconds, 3),
        "requests": len(window),
        "resources": sum(d[2] for d in window),
        "points": sum(d[3] for d in window),
        "resources_per_s": sum(d[2] for d in window) / seconds,
        "points_per_s": sum(d[3] for d in window) / seconds,
        "latency_p50_ms": percentile(latencies, 0.50) * 1000,
        "latency_p99_ms": percentile(latencies, 0.99) * 1000,
    }


async def run_fleet(job: Job) -> dict[str, Any]:
    spec = FleetSpec(**job.spec)
    exports = Fleet(spec).requests()
    first = next(exports)
    check_export(first)
    driver = Driver(job, _chain(first, exports))
    reporter = asyncio.create_task(_progress(driver, job.progress_s, None))
    window: dict[str, float] = {}

    # Requests in whole simulated minutes of the whole fleet: every node crosses the same
    # number of minute boundaries in any such run of consecutive scrapes.
    interval_ms = max(1, round(spec.interval_s * 1000))
    cycle = spec.nodes * (math.lcm(60_000, interval_ms) // interval_ms)

    async def reach(requests: int) -> None:
        deadline = time.monotonic() + job.reach_timeout_s
        while driver.tally.requests < requests:
            if driver.error is not None:
                raise RuntimeError(driver.error)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the service acknowledged {driver.tally.requests} of {requests} requests "
                    f"within {job.reach_timeout_s:.0f} s"
                )
            await asyncio.sleep(0.002)

    async def clock() -> None:
        try:
            await phases()
        except Exception as exc:  # e.g. the service died: /proc has no CPU times for it
            if driver.error is None:
                driver.error = f"measurement failed: {exc}"
        finally:
            if driver.error is not None:
                driver.stop_at = time.monotonic()  # the workers stop; run() returns

    async def phases() -> None:
        driver.phase = "prime"
        await reach(spec.nodes)
        window["prime_s"] = time.monotonic() - started
        driver.phase = "warmup"
        await asyncio.sleep(job.warmup_s)
        await reach(-(-driver.tally.requests // cycle) * cycle)
        window["start"] = time.monotonic()
        first = driver.tally.requests
        window["service_cpu0"] = procstat.tree_cpu_seconds(job.service_pid)
        window["own_cpu0"] = procstat.cpu_seconds()
        driver.phase = "measure"
        emit("measure", phase="measure", seconds=job.duration_s)
        await asyncio.sleep(job.duration_s)
        cycles = max(1, -(-(driver.tally.requests - first) // cycle))
        await reach(first + cycles * cycle)
        window["end"] = time.monotonic()
        window["cycles"] = cycles
        window["service_cpu1"] = procstat.tree_cpu_seconds(job.service_pid)
        window["own_cpu1"] = procstat.cpu_seconds()
        driver.stop_at = window["end"] + job.extra_s
        if job.extra_s > 0:
            driver.phase = "extra"
            emit("extra", phase="extra", seconds=job.extra_s)
            await asyncio.sleep(job.extra_s)
        driver.phase = "drain"

    started = time.monotonic()
    timer = asyncio.create_task(clock())
    try:
        await driver.run()
        if driver.error is None:
            # The workers stop when the clock ends the window (or fails): by then only the
            # `extra` load is left on the clock.
            await asyncio.wait_for(timer, timeout=job.extra_s + 5)
    finally:
        timer.cancel()
        reporter.cancel()
    if driver.error is not None:
        raise RuntimeError(driver.error)
    seconds = window["end"] - window["start"]
    result = _summary(driver.tally, window["start"], window["end"])
    result.update(
        prime_s=window["prime_s"],
        simulated_minutes=window["cycles"],
        service_cpu=(window["service_cpu1"] - window["service_cpu0"]) / seconds,
        loadgen_cpu=(window["own_cpu1"] - window["own_cpu0"]) / seconds,
        retries=driver.tally.retries,
        partial=driver.tally.partial,
        request_bytes=len(first.payload),
        simulated_s=(driver.tally.requests / spec.nodes) * spec.interval_s,
    )
    return result


async def run_history(job: Job) -> dict[str, Any]:
    plan = HistoryPlan(HistorySpec(**job.spec))
    exports = (plan.export(s) for s in plan.scrapes(job.stage))
    first = next(exports)
    check_export(first)
    driver = Driver(job, _chain(first, exports))
    reporter = asyncio.create_task(_progress(driver, job.progress_s, plan.stage_keys(job.stage)))
    started = time.monotonic()
    cpu0 = procstat.cpu_seconds()
    try:
        await driver.run()
    finally:
        reporter.cancel()
    if driver.error is not None:
        raise RuntimeError(driver.error)
    ended = time.monotonic()
    result = _summary(driver.tally, started, ended)
    result.update(
        keys=driver.tally.keys,
        retries=driver.tally.retries,
        partial=driver.tally.partial,
        keys_per_s=driver.tally.keys / max(1e-9, ended - started),
        loadgen_cpu=(procstat.cpu_seconds() - cpu0) / max(1e-9, ended - started),
    )
    return result


async def run_probe(job: Job) -> dict[str, Any]:
    exports = Fleet(FleetSpec(**job.spec)).requests()
    first = next(exports)
    check_export(first)
    channel = grpc.aio.insecure_channel(
        job.target,
        options=[("grpc.max_send_message_length", 64 << 20)],
        compression=grpc.Compression.Gzip,
    )
    samples: list[tuple[str, float, float]] = []
    retries = partial = 0
    try:
        call = channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=None,
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )

        async def send(export: Export) -> float:
            """Seconds from the first attempt to the acknowledgement (retries included)."""
            nonlocal retries, partial
            started = time.monotonic()
            while True:
                try:
                    response = await call(export.payload, timeout=job.timeout_s)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in _RETRYABLE and time.monotonic() - started < job.timeout_s:
                        retries += 1
                        await asyncio.sleep(0.05)
                        continue
                    failed = f"Export failed: {exc.code().name}: {exc.details()}"
                    raise RuntimeError(failed) from None
                if response.partial_success.rejected_data_points:
                    partial += 1
                return time.monotonic() - started

        prime_s = await send(first)  # the node's first scrape: every process is a new key
        if job.metrics_url:
            await asyncio.to_thread(_stream_settled, job.metrics_url, 60.0)
        else:
            await asyncio.sleep(max(job.period_s, 0.5))
        for name in job.windows:
            emit("window", window=name, at=time.monotonic())
            start = time.monotonic()
            slot = start
            while slot < start + job.duration_s:
                export = next(exports)
                if export.time_ms > time.time() * 1000 + _MAX_FUTURE_MS:
                    raise RuntimeError("the probe's simulated time ran ahead of the clock")
                await asyncio.sleep(max(0.0, slot - time.monotonic()))
                began = time.monotonic()
                samples.append((name, began, await send(export)))
                # A slow acknowledgement delays the next Export; it does not bunch them up.
                slot = max(slot + job.period_s, time.monotonic())
    finally:
        await channel.close()
    return {
        "prime_s": prime_s,
        "samples": [[w, round(t, 6), round(s, 6)] for w, t, s in samples],
        "retries": retries,
        "partial": partial,
        "request_bytes": len(first.payload),
    }


def _stream_settled(url: str, timeout: float) -> None:
    """Wait until the service's stream queue is empty and its stream alert count has stayed
    the same for half a second (the prime's alerts are published), or `timeout` passes."""
    import urllib.request

    def read() -> tuple[float, float]:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        depth = alerts = 0.0
        for line in text.splitlines():
            if line.startswith("pathwatch_stream_queue_depth"):
                depth += float(line.rpartition(" ")[2])
            elif line.startswith("pathwatch_stream_alerts_total{"):
                alerts += float(line.rpartition(" ")[2])
        return depth, alerts

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        depth, alerts = read()
        if depth == 0 and alerts == last:
            return
        last = alerts if depth == 0 else None
        time.sleep(0.5)


def _chain(first: Export, rest: Iterator[Export]) -> Iterator[Export]:
    yield first
    yield from rest


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.loadgen JOB_JSON", file=sys.stderr)
        return 2
    fields = json.loads(argv[0])
    fields["windows"] = tuple(fields.get("windows", ()))
    job = Job(**fields)
    runner = {"fleet": run_fleet, "history": run_history, "probe": run_probe}[job.source]
    try:
        result = asyncio.run(runner(job))
    except (RuntimeError, TimeoutError) as exc:
        emit("error", message=str(exc) or type(exc).__name__)
        return 1
    emit("result", **result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
