"""Dispatcher: drains each sink's outbox with bounded concurrency, retries, and dead-letters.

At-least-once: a delivery record leaves the outbox only when its sink acknowledged it (2xx) or it
is moved to the dead letters (permanent failure, or older than ``retry.max_age``). Retries use
exponential backoff with full jitter, never shorter than the sink's Retry-After. A 410 Gone
disables the sink until restart and keeps its records.

Within one process each record is sent once per attempt: a worker claims it before sending, and
a record acknowledged while the outbox was being read is not queued again by that read.
Workers never die of one batch: an unexpected exception is logged with its stack, counted in
``pathwatch_component_failures_total{component="sink:<name>"}``, the batch is retried later, and
the worker goes on after a short backoff. An alert that the sink cannot format is dead-lettered
alone; the others of its batch are sent.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from pathwatch.alerts.http import HttpPoster, HttpRequest, SendResult
from pathwatch.alerts.sinks import Sink, build_sink
from pathwatch.clock import Clock
from pathwatch.config.model import SinkConfig
from pathwatch.store.alertlog import AlertStore, Delivery
from pathwatch.store.db import StoreError
from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="alerts")

_REFRESH_S = 5.0
_DEADLETTER_REFRESH_S = 60.0  # the dead-letter gauge is a scan: read it seldom, or on change
_MAX_WAIT_S = 1.0
_MAX_LOADED = 10_000  # outbox records held in memory per sink; the rest stay in RocksDB
_FAILURE_BACKOFF_S = (0.2, 5.0)  # a worker's pause after an unexpected exception: first, most


def backoff_seconds(
    attempts: int, initial: float, maximum: float, rng: random.Random, retry_after: float | None
) -> float:
    """Full jitter: uniform in [0, min(max, initial * 2^(attempts-1))], at least Retry-After."""
    ceiling = min(maximum, initial * (2 ** min(max(0, attempts - 1), 62)))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def _int(value: object) -> int:
    """An attempt count read from a stored record, 0 when it is not a number."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True, slots=True)
class SinkStatus:
    name: str
    type: str
    disabled: str | None
    depth: int
    oldest_age_s: float


class SinkWorker:
    """Delivers one sink's outbox. Threads: `max_concurrency`; all waits are bounded.

    The in-memory queue mirrors part of the outbox. One worker at a time reads the outbox into
    it (`_refresh`); while that read runs, the records other workers acknowledge or dead-letter
    are noted (`_settled`) so the read cannot bring them back. Without that, a read that began
    before an acknowledgement re-queued the record after it, and it was sent twice.
    """

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
        self._poster = HttpPoster(self.config, clock, max_idle=self.config.max_concurrency)
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
        self._refreshing = threading.Lock()  # held by the one worker reading the outbox
        self._settled: set[int] | None = None  # records gone from the outbox during that read
        self._reading = False  # a read of the outbox is under way (guarded by _cond)
        self._more = False  # the last read stopped at the memory bound: more wait in RocksDB
        self._last_refresh = 0.0
        self._deadletters_read = -_DEADLETTER_REFRESH_S  # monotonic time of the last count
        self._deadletters_changed = True
        self._threads: list[threading.Thread] = []
        self.disabled: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def component(self) -> str:
        """The name of this sink's workers in the supervision metrics."""
        return f"sink:{self.name}"

    def start(self) -> None:
        if self._threads:
            return
        try:
            self._refresh()
        except Exception:  # the workers read it again; starting must not fail on it
            self._failed(None)
        for i in range(self.config.max_concurrency):
            t = threading.Thread(
                target=self._run, name=f"pathwatch-sink-{self.name}-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)
        self._metrics.component_up.labels(component=self.component).set(1)

    def notify(self, full: bool = False) -> None:
        """New records are in the outbox; `full` re-reads all of it (after a redrive, whose
        records keep their old sequence numbers)."""
        with self._cond:
            self._dirty = True
            self._full |= full
            if full:
                self._deadletters_changed = True
            self._cond.notify_all()

    def shutdown(self, timeout: float) -> None:
        """Stop the workers, waiting `timeout` in total for a request in flight to end."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._poster.close()
        if self._threads and not any(t.is_alive() for t in self._threads):
            self._metrics.component_up.labels(component=self.component).set(0)

    def status(self) -> SinkStatus:
        with self._cond:
            oldest = min(
                (d.record.get("enqueued_ms", 0) for d in self._queue.values()), default=None
            )
            queued = len(self._queue)
        depth = max(self._alerts.depth(self.name), queued)
        age = 0.0 if oldest is None else max(0.0, (self._clock.now_ms() - oldest) / 1000)
        return SinkStatus(self.name, self.config.type, self.disabled, depth, age)

    # -- the outbox in memory ----------------------------------------------------------------

    def _refresh(self) -> None:
        """Load outbox records not loaded yet, keeping at most _MAX_LOADED in memory (the rest
        wait in RocksDB), and refresh the depth and dead-letter figures. Returns at once when
        another worker is reading the outbox: that read serves this one too (`_dirty` stays
        set when a notification came after it began)."""
        if not self._refreshing.acquire(blocking=False):
            return
        try:
            with self._cond:
                full, self._full = self._full, False
                self._dirty = False
                after = 0 if full else self._loaded_seq
                room = _MAX_LOADED - len(self._queue)
                self._settled = set()
                self._reading = True
                count_dead = self._deadletters_changed or (
                    self._clock.monotonic() - self._deadletters_read > _DEADLETTER_REFRESH_S
                )
                self._deadletters_changed = False
            self._last_refresh = self._clock.monotonic()
            try:
                fresh = self._alerts.pending(self.name, after, limit=room) if room > 0 else []
                dead = self._alerts.deadletter_count(self.name) if count_dead else None
            except BaseException as exc:
                with self._cond:
                    self._settled, self._reading = None, False
                    self._full |= full
                    self._deadletters_changed |= count_dead
                if not isinstance(exc, StoreError):
                    raise
                log.error("cannot read outbox", sink=self.name, error=str(exc))
                return
            with self._cond:
                # In one critical section with taking `_settled`: a record acknowledged after
                # this point is in the queue already, and `_forget` removes it from there.
                settled, self._settled = self._settled or set(), None
                for d in fresh:
                    if d.seq not in self._queue and d.seq not in settled:
                        self._queue[d.seq] = d
                    self._loaded_seq = max(self._loaded_seq, d.seq)
                self._more = room <= 0 or len(fresh) >= room
                self._reading = False
                self._cond.notify_all()
            if dead is not None:
                self._deadletters_read = self._clock.monotonic()
                self._metrics.deadletters.labels(sink=self.name).set(dead)
            self._publish()
        finally:
            self._refreshing.release()

    def _publish(self) -> None:
        """Update the depth and age gauges. Not under `_cond`: the depth counter takes the
        store's lock, which a large tick commit holds for a while."""
        depth = self._alerts.depth(self.name)
        with self._cond:
            queued = len(self._queue)
            oldest = min(
                (d.record.get("enqueued_ms", 0) for d in self._queue.values()), default=None
            )
        self._metrics.outbox_depth.labels(sink=self.name).set(max(depth, queued))
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
            if self._dirty and not self._reading:
                return []  # read the outbox first; while another worker reads it, wait for it
            wait = _MAX_WAIT_S if soonest is None else min(_MAX_WAIT_S, (soonest - now) / 1000)
            self._cond.wait(max(0.01, wait))
            return []

    def _forget(self, d: Delivery) -> None:
        """`d` left the outbox (acknowledged or dead-lettered): drop it from memory, and keep
        a read of the outbox that is under way from bringing it back."""
        with self._cond:
            self._queue.pop(d.seq, None)
            self._not_before.pop(d.seq, None)
            if self._settled is not None:
                self._settled.add(d.seq)
            if self._more and len(self._queue) < _MAX_LOADED // 2:
                self._dirty = True  # room again for records that wait in RocksDB

    # -- the worker loop -------------------------------------------------------------------

    def _run(self) -> None:
        """One worker thread. Returns only on shutdown: whatever one pass raises is counted,
        logged with its stack, and followed by a pause that doubles up to a few seconds."""
        pause = _FAILURE_BACKOFF_S[0]
        while True:
            with self._cond:
                if self._stop:
                    return
            batch: list[Delivery] = []
            try:
                try:
                    with self._cond:
                        dirty = self._dirty
                    if dirty or self._clock.monotonic() - self._last_refresh > _REFRESH_S:
                        self._refresh()
                    batch = self._claim()
                    if batch:
                        self._deliver(batch)
                finally:
                    if batch:
                        with self._cond:
                            self._inflight.difference_update(d.seq for d in batch)
                            self._cond.notify_all()
                if batch:
                    self._publish()
                pause = _FAILURE_BACKOFF_S[0]
            except Exception:
                try:
                    self._failed(batch)
                except Exception:  # whatever the record holds, the worker lives on
                    log.exception("sink worker cannot reschedule a failed batch", sink=self.name)
                with self._cond:
                    if not self._stop:
                        self._cond.wait(pause)
                pause = min(_FAILURE_BACKOFF_S[1], pause * 2)

    def _failed(self, batch: Sequence[Delivery] | None) -> None:
        """Count and log the exception being handled; `batch` is sent again after a backoff."""
        self._metrics.component_failures.labels(component=self.component).inc()
        log.exception(
            "sink worker failed; going on after a pause",
            sink=self.name,
            alert_ids=[d.record.get("alert_id") for d in batch or ()][:10],
        )
        if batch:
            retry = self.config.retry
            now = self._clock.now_ms()
            with self._cond:
                for d in batch:
                    # Counted in memory only (the store may be what failed): the backoff grows
                    # as for any retry, so a failure that repeats is not logged every second.
                    attempts = _int(d.record.get("attempts")) + 1
                    d.record["attempts"] = attempts
                    delay = backoff_seconds(
                        attempts, retry.initial_backoff, retry.max_backoff, self._rng, None
                    )
                    self._not_before[d.seq] = now + int(delay * 1000)

    def _request(self, batch: Sequence[Delivery]) -> tuple[HttpRequest | None, list[Delivery]]:
        """The request for `batch`, leaving out (dead-lettered, counted, logged) each alert the
        sink cannot format: formatting is deterministic, so trying such an alert again would
        fail again. Returns (None, []) when no alert of the batch can be formatted."""
        try:
            return self.sink.request(batch), list(batch)
        except Exception:
            self._metrics.component_failures.labels(component=self.component).inc()
            log.exception("sink cannot format a batch", sink=self.name, alerts=len(batch))
        good: list[Delivery] = []
        for d in batch:
            try:
                self.sink.request([d])
            except Exception as exc:
                reason = f"cannot build request: {type(exc).__name__}: {exc}"
                self._alerts.dead_letter(d, reason)
                self._forget(d)
                with self._cond:
                    self._deadletters_changed = True
                m = self._metrics
                m.deliveries.labels(sink=self.name, outcome="failed").inc()
                m.deliveries.labels(sink=self.name, outcome="dead_lettered").inc()
                log.error("alert dead-lettered", sink=self.name, alert_id=d.alert_id, reason=reason)
            else:
                good.append(d)
        return (self.sink.request(good), good) if good else (None, [])

    def _deliver(self, claimed: Sequence[Delivery]) -> None:
        m = self._metrics
        request, batch = self._request(claimed)
        if request is None:
            return
        started = self._clock.monotonic()
        result = self._poster.post(request)
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
                    # The attempt that failed counts: a dead letter shows how many were made.
                    d.record["attempts"] = _int(d.record.get("attempts")) + 1
                    self._alerts.dead_letter(d, result.detail)
                    self._forget(d)
                with self._cond:
                    self._deadletters_changed = True
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
                with self._cond:
                    self._deadletters_changed = True
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
        """Stop every sink's workers within about `timeout` in total (they stop in parallel:
        a request in flight ends on its own timeout at worst)."""
        for w in self.workers:
            w.shutdown(0)  # asks every worker to stop before waiting for any
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.shutdown(max(0.0, deadline - time.monotonic()))
