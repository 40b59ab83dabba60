"""Scheduler: a thread that runs due ticks; the decision of which ticks are due is `due_ticks`.

A tick T of a rule is due once the clock passes T + the rule's delay (time for late data to
arrive). Ticks are recorded by the TickRunner, so none runs twice, whether the scheduler or the
API ran it first. After downtime the missed ticks run, newest first up to a bound; none before the
data directory's first start.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog
from croniter import croniter

from pathwatch.clock import Clock
from pathwatch.rules.model import Rule
from pathwatch.scheduler.runner import TickRunner
from pathwatch.store.alertlog import AlertStore
from pathwatch.store.db import StoreError
from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="scheduler")

_SKIP_COUNT_LIMIT = 100_000
_CATCH_UP_SLACK_MS = 5 * 60_000


def due_ticks(
    schedule: str, after_ms: int, due_before_ms: int, limit: int
) -> tuple[list[int], int]:
    """Cron ticks T with after_ms < T <= due_before_ms: (newest `limit` of them ascending, skipped).

    `skipped` counts the older ones beyond the limit (bounded by an iteration cap).
    """
    if due_before_ms <= after_ms:
        return [], 0
    start = datetime.fromtimestamp(due_before_ms / 1000, tz=UTC)
    it = croniter(schedule, start)
    ticks: list[int] = []
    # croniter's get_prev excludes the start itself when it is a tick: check it first.
    if croniter.match(schedule, start) and due_before_ms % 60_000 == 0:
        ticks.append(due_before_ms)
    skipped = 0
    while True:
        t = int(it.get_prev(float) * 1000)
        if t <= after_ms:
            break
        if len(ticks) < limit:
            ticks.append(t)
        else:
            skipped += 1
            if skipped >= _SKIP_COUNT_LIMIT:
                break
    ticks.sort()
    return ticks[-limit:] if limit > 0 else [], skipped


def next_tick(schedule: str, after_ms: int) -> int:
    it = croniter(schedule, datetime.fromtimestamp(after_ms / 1000, tz=UTC))
    return int(it.get_next(float) * 1000)


class Scheduler:
    """start() launches the thread; shutdown() stops it within `timeout` (an evaluation in
    progress finishes first). `run_due` is the whole decision and is called directly by tests.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        runner: TickRunner,
        alerts: AlertStore,
        clock: Clock,
        metrics: Metrics,
        first_start_ms: int,
        catch_up_max_ticks: int = 24,
        alert_retention_s: float = 30 * 86400.0,
    ) -> None:
        self._rules = [r for r in rules if r.enabled]
        self._runner = runner
        self._alerts = alerts
        self._clock = clock
        self._metrics = metrics
        self._first_start_ms = first_start_ms
        self._max_ticks = catch_up_max_ticks
        self._alert_retention_ms = int(alert_retention_s * 1000)
        self._next_housekeeping = 0.0
        self._cursor: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _cursor_of(self, rule: Rule) -> int:
        cursor = self._cursor.get(rule.id)
        if cursor is None:
            last = self._alerts.last_tick(rule.id)
            cursor = last.tick_ms if last else self._first_start_ms - 1
            self._cursor[rule.id] = cursor
        return cursor

    def run_due(self, now_ms: int) -> int:
        """Run every due tick of every rule; returns how many ran. Errors are logged and the
        tick is retried on the next call."""
        ran = 0
        for rule in self._rules:
            cursor = self._cursor_of(rule)
            horizon = now_ms - int(rule.delay_seconds * 1000)
            ticks, skipped = due_ticks(rule.schedule, cursor, horizon, self._max_ticks)
            if skipped:
                self._metrics.skipped_ticks.labels(rule=rule.id).inc(skipped)
                log.warning(
                    "missed ticks beyond the catch-up bound are skipped",
                    rule=rule.id,
                    skipped=skipped,
                    catch_up_max_ticks=self._max_ticks,
                )
            for tick in ticks:
                if self._stop.is_set():
                    return ran
                try:
                    self._runner.run(rule, tick)
                except StoreError as exc:
                    self.last_error = f"rule {rule.id}: {exc}"
                    log.error("tick failed; will retry", rule=rule.id, tick=tick, error=str(exc))
                    break
                self.last_error = None
                if horizon - tick > _CATCH_UP_SLACK_MS:
                    self._metrics.catchup_ticks.labels(rule=rule.id).inc()
                self._cursor[rule.id] = tick
                ran += 1
        return ran

    def _housekeeping(self) -> None:
        """Hourly: drop alerts and tick records past the alert retention."""
        if self._clock.monotonic() < self._next_housekeeping:
            return
        self._next_housekeeping = self._clock.monotonic() + 3600.0
        before = self._clock.now_ms() - self._alert_retention_ms
        self._alerts.expire([r.id for r in self._rules], before)

    def seconds_until_next(self, now_ms: int) -> float:
        waits = [
            next_tick(r.schedule, self._cursor_of(r)) + r.delay_seconds * 1000 - now_ms
            for r in self._rules
        ]
        return max(0.0, min(waits, default=60_000) / 1000)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="pathwatch-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_due(self._clock.now_ms())
                self._housekeeping()
                wait = self.seconds_until_next(self._clock.now_ms())
            except Exception as exc:  # keep the scheduler alive; the error is visible in /readyz
                self.last_error = str(exc)
                log.exception("scheduler loop failed")
                wait = 5.0
            # Bounded wait: re-check at least every 5 s so clock jumps and shutdown are seen.
            self._stop.wait(min(max(wait, 0.05), 5.0))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Safe before start and twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
