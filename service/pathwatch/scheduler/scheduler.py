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
    """`run(stop)` is the scheduler's loop, for the Supervisor to run on its own thread (start()
    runs it unsupervised, for tests and tools); shutdown() stops it within `timeout` (an
    evaluation in progress finishes first). `run_due` is the whole decision and is called
    directly by tests.

    A rule whose tick fails never holds up the others: the error is kept per rule
    (`rule_errors`, shown by /api/v1/rules and /readyz) until a tick of that rule succeeds.
    Ticks whose window ends before the data directory's first start are never run, whatever
    ticks were recorded through the API: there was no data for them.
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
        self._looping = False
        self.rule_errors: dict[str, str] = {}
        self.loop_error: str | None = None

    @property
    def running(self) -> bool:
        return self._looping

    @property
    def last_error(self) -> str | None:
        """The loop's own error, else each failing rule's, or None when all is well."""
        if self.loop_error is not None:
            return self.loop_error
        if self.rule_errors:
            return "; ".join(f"rule {r}: {e}" for r, e in sorted(self.rule_errors.items()))
        return None

    def _cursor_of(self, rule: Rule) -> int:
        cursor = self._cursor.get(rule.id)
        if cursor is None:
            last = self._alerts.last_tick(rule.id)
            # A tick recorded through the API may name any past minute: never catch up from
            # before the first start, when no data could exist.
            floor = self._first_start_ms - 1
            cursor = max(last.tick_ms, floor) if last else floor
            self._cursor[rule.id] = cursor
        return cursor

    def run_due(self, now_ms: int) -> int:
        """Run every due tick of every rule; returns how many ran. A failing tick is logged,
        kept in `rule_errors` and retried on the next call; the other rules run regardless."""
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
                except StoreError as exc:  # retryable: the disk, not the rule
                    self.rule_errors[rule.id] = str(exc)
                    log.error("tick failed; will retry", rule=rule.id, tick=tick, error=str(exc))
                    break
                except Exception as exc:
                    self.rule_errors[rule.id] = f"{type(exc).__name__}: {exc}"
                    self._metrics.component_failures.labels(component=f"rule:{rule.id}").inc()
                    log.exception("tick failed; will retry", rule=rule.id, tick=tick)
                    break
                self.rule_errors.pop(rule.id, None)
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
        """Run the loop on a plain thread (the service runs `run` under its Supervisor)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="pathwatch-scheduler", daemon=True
        )
        self._thread.start()

    def run(self, stop: threading.Event) -> None:
        """The loop. Returns when `stop` (or shutdown) is set; an unexpected exception outside
        a rule's tick escapes, for the Supervisor to log, count and restart."""
        self._looping = True
        try:
            while not stop.is_set() and not self._stop.is_set():
                try:
                    self.run_due(self._clock.now_ms())
                    self._housekeeping()
                    wait = self.seconds_until_next(self._clock.now_ms())
                except StoreError as exc:  # retryable: visible in /readyz until it clears
                    self.loop_error = str(exc)
                    log.error("scheduler housekeeping failed; will retry", error=str(exc))
                    wait = 5.0
                else:
                    self.loop_error = None
                # Bounded wait: re-check at least every 5 s so clock jumps and shutdown are seen.
                if stop.wait(min(max(wait, 0.05), 5.0)):
                    break
        finally:
            self._looping = False

    def shutdown(self, timeout: float = 10.0) -> None:
        """Safe before start and twice. A supervised loop also stops with its Supervisor."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
