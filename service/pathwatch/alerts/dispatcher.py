"""Dispatcher: drains each sink's outbox with bounded concurrency, retries, and dead-letters.

At-least-once: a delivery record leaves the outbox only when its sink acknowledged it (2xx) or it
is moved to the dead letters (permanent failure, or older than ``retry.max_age``). Retries use
exponential backoff with full jitter, never shorter than the sink's Retry-After. A 410 Gone
disables the sink until restart and keeps its records.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from pathwatch.alerts.http import HttpPoster, SendResult
from pathwatch.alerts.sinks import Sink, build_sink
from pathwatch.clock import Clock
from pathwatch.config.model import SinkConfig
from pathwatch.store.alertlog import AlertStore, Delivery
from pathwatch.store.db import StoreError
from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="alerts")

_REFRESH_S = 5.0
_MAX_WAIT_S = 1.0
_MAX_LOADED = 10_000  # outbox records held in memory per sink; the rest stay in RocksDB


def backoff_seconds(
    attempts: int, initial: float, maximum: float, rng: random.Random, retry_after: float | None
) -> float:
    """Full jitter: uniform in [0, min(max, initial * 2^(attempts-1))], at least Retry-After."""
    ceiling = min(maximum, initial * (2 ** min(max(0, attempts - 1), 62)))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


@dataclass(frozen=True, slots=True)
class SinkStatus:
    name: str
    type: str
    disabled: str | None
    depth: int
    oldest_age_s: float


class SinkWorker:
    """Delivers one sink's outbox. Threads: `max_concurrency`; all waits are bounded."""

    def __init__(
        self,
        sink: Sink,
        alerts: AlertStore,
        clock: Clock,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self.sink = sink
        self.config: SinkConfig = sink.config
        self._poster = HttpPoster(self.config, clock)
        self._alerts = alerts
        self._clock = clock
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._cond = threading.Condition()
        self._queue: dict[int, Delivery] = {}
        self._loaded_seq = 0
        self._inflight: set[int] = set()
        self._not_before: dict[int, int] = {}
        self._stop = False
        self._dirty = True
        self._full = False
        self._depth = 0
        self._threads: list[threading.Thread] = []
        self.disabled: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def start(self) -> None:
        if self._threads:
            return
        self._refresh()
        for i in range(self.config.max_concurrency):
            t = threading.Thread(
                target=self._loop, name=f"pathwatch-sink-{self.name}-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def notify(self, full: bool = False) -> None:
        """New records are in the outbox; `full` re-reads all of it (after a redrive, whose
        records keep their old sequence numbers)."""
        with self._cond:
            self._dirty = True
            self._full |= full
            self._cond.notify_all()

    def shutdown(self, timeout: float) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def status(self) -> SinkStatus:
        with self._cond:
            oldest = min(
                (d.record.get("enqueued_ms", 0) for d in self._queue.values()), default=None
            )
            depth = max(self._depth, len(self._queue))
        age = 0.0 if oldest is None else max(0.0, (self._clock.now_ms() - oldest) / 1000)
        return SinkStatus(self.name, self.config.type, self.disabled, depth, age)

    def _refresh(self) -> None:
        """Load outbox records not loaded yet, keeping at most _MAX_LOADED in memory (the rest
        wait in RocksDB), and refresh the depth and dead-letter figures."""
        with self._cond:
            full, self._full = self._full, False
            after = 0 if full else self._loaded_seq
            room = _MAX_LOADED - len(self._queue)
        try:
            fresh = self._alerts.pending(self.name, after, limit=room) if room > 0 else []
            depth = self._alerts.depth(self.name)
            dead = self._alerts.deadletter_count(self.name)
        except StoreError as exc:
            log.error("cannot read outbox", sink=self.name, error=str(exc))
            return
        with self._cond:
            for d in fresh:
                if d.seq not in self._queue:
                    self._queue[d.seq] = d
                self._loaded_seq = max(self._loaded_seq, d.seq)
            self._depth = depth
            self._dirty = False
            self._publish()
        self._metrics.deadletters.labels(sink=self.name).set(dead)

    def _publish(self) -> None:
        self._metrics.outbox_depth.labels(sink=self.name).set(max(self._depth, len(self._queue)))
        oldest = min((d.record.get("enqueued_ms", 0) for d in self._queue.values()), default=None)
        age = 0.0 if oldest is None else max(0.0, (self._clock.now_ms() - oldest) / 1000)
        self._metrics.outbox_oldest_age.labels(sink=self.name).set(age)

    def _claim(self) -> list[Delivery]:
        """Up to batch_size ready deliveries, or [] after a bounded wait."""
        with self._cond:
            if self._stop or self.disabled:
                self._cond.wait(_MAX_WAIT_S)
                return []
            now = self._clock.now_ms()
            batch: list[Delivery] = []
            soonest: int | None = None
            for seq in sorted(self._queue):
                if seq in self._inflight:
                    continue
                nb = self._not_before.get(seq, 0)
                if nb > now:
                    soonest = nb if soonest is None else min(soonest, nb)
                    continue
                batch.append(self._queue[seq])
                if len(batch) >= self.sink.batch_size:
                    break
            if batch:
                self._inflight.update(d.seq for d in batch)
                return batch
            wait = _MAX_WAIT_S if soonest is None else min(_MAX_WAIT_S, (soonest - now) / 1000)
            self._cond.wait(max(0.01, wait))
            return []

    def _loop(self) -> None:
        last_refresh = self._clock.monotonic()
        while True:
            with self._cond:
                if self._stop:
                    return
                dirty = self._dirty
            if dirty or self._clock.monotonic() - last_refresh > _REFRESH_S:
                self._refresh()
                last_refresh = self._clock.monotonic()
            batch = self._claim()
            if batch:
                try:
                    self._deliver(batch)
                finally:
                    with self._cond:
                        self._inflight.difference_update(d.seq for d in batch)
                        self._publish()
                        self._cond.notify_all()

    def _deliver(self, batch: Sequence[Delivery]) -> None:
        m = self._metrics
        started = self._clock.monotonic()
        try:
            result = self._poster.post(self.sink.request(batch))
        except Exception as exc:  # a sink bug must not kill the worker: classify as permanent
            result = SendResult("permanent", f"cannot build request: {exc}")
        m.delivery_seconds.labels(sink=self.name).observe(self._clock.monotonic() - started)
        try:
            if result.outcome == "ok":
                for d in batch:
                    self._alerts.ack(d)
                    self._forget(d)
                m.deliveries.labels(sink=self.name, outcome="delivered").inc(len(batch))
                log.debug("delivered", sink=self.name, alerts=len(batch))
            elif result.outcome == "gone":
                self.disabled = result.detail
                m.sink_disabled.labels(sink=self.name).set(1)
                m.deliveries.labels(sink=self.name, outcome="failed").inc(len(batch))
                log.error(
                    "sink answered 410 Gone: sink disabled until restart; its alerts are kept",
                    sink=self.name,
                    detail=result.detail,
                )
            elif result.outcome == "permanent":
                for d in batch:
                    self._alerts.dead_letter(d, result.detail)
                    self._forget(d)
                m.deliveries.labels(sink=self.name, outcome="failed").inc(len(batch))
                m.deliveries.labels(sink=self.name, outcome="dead_lettered").inc(len(batch))
                log.error(
                    "delivery failed permanently; dead-lettered",
                    sink=self.name,
                    alerts=len(batch),
                    detail=result.detail,
                )
            else:
                self._retry(batch, result)
        except StoreError as exc:
            log.error("outbox update failed; will retry", sink=self.name, error=str(exc))

    def _retry(self, batch: Sequence[Delivery], result: SendResult) -> None:
        m = self._metrics
        retry = self.config.retry
        now = self._clock.now_ms()
        for d in batch:
            attempts = int(d.record.get("attempts", 0)) + 1
            d.record["attempts"] = attempts
            d.record["last_error"] = result.detail
            if now - int(d.record.get("enqueued_ms", now)) > retry.max_age * 1000:
                reason = (
                    f"gave up after {attempts} attempts over {retry.max_age:g}s: {result.detail}"
                )
                self._alerts.dead_letter(d, reason)
                self._forget(d)
                m.deliveries.labels(sink=self.name, outcome="dead_lettered").inc()
                log.error(
                    "delivery exceeded max_age; dead-lettered",
                    sink=self.name,
                    alert_id=d.alert_id,
                    detail=result.detail,
                )
                continue
            self._alerts.update(d)
            delay = backoff_seconds(
                attempts, retry.initial_backoff, retry.max_backoff, self._rng, result.retry_after
            )
            with self._cond:
                self._not_before[d.seq] = now + int(delay * 1000)
            m.deliveries.labels(sink=self.name, outcome="retried").inc()
            log.warning(
                "delivery failed; will retry",
                sink=self.name,
                alert_id=d.alert_id,
                attempt=attempts,
                retry_in_s=round(delay, 2),
                detail=result.detail,
            )

    def _forget(self, d: Delivery) -> None:
        with self._cond:
            if self._queue.pop(d.seq, None) is not None:
                self._depth = max(0, self._depth - 1)
            self._not_before.pop(d.seq, None)


class Dispatcher:
    """One SinkWorker per configured sink. Raises ValueError at construction for a bad sink."""

    def __init__(
        self, sinks: Sequence[SinkConfig], alerts: AlertStore, clock: Clock, metrics: Metrics
    ) -> None:
        self.workers = [SinkWorker(build_sink(s, clock), alerts, clock, metrics) for s in sinks]

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def notify(self, full: bool = False) -> None:
        for w in self.workers:
            w.notify(full)

    def statuses(self) -> list[SinkStatus]:
        return [w.status() for w in self.workers]

    def shutdown(self, timeout: float = 10.0) -> None:
        for w in self.workers:
            w.shutdown(timeout / max(1, len(self.workers)))
