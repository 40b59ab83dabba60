"""TickRunner: evaluates one rule at one tick and commits the tick, its alerts and deliveries.

Used by the scheduler and by the evaluate API alike, so both run a tick exactly the same way. A
tick already recorded is never evaluated again: its stored alerts are returned instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from pathwatch.alerts.event import RiskEvent, risk_event
from pathwatch.clock import Clock
from pathwatch.config.model import SinkConfig
from pathwatch.engine.evaluate import PresenceReader, evaluate
from pathwatch.rules.model import Rule
from pathwatch.store.alertlog import AlertStore, TickRecord
from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="scheduler")


@dataclass(frozen=True, slots=True)
class TickOutcome:
    alerts: list[dict[str, Any]]
    new: bool  # False when the tick had been recorded before (nothing was evaluated or queued)


def sink_wants(sink: SinkConfig, event: RiskEvent) -> bool:
    if event.risk_score < sink.min_risk_score:
        return False
    return not sink.rules or event.rule_id in sink.rules


class TickRunner:
    def __init__(
        self,
        reader: PresenceReader,
        alerts: AlertStore,
        sinks: Sequence[SinkConfig],
        clock: Clock,
        metrics: Metrics,
        outbox_depth: Callable[[str], int],
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self._reader = reader
        self._alerts = alerts
        self._sinks = list(sinks)
        self._clock = clock
        self._metrics = metrics
        self._outbox_depth = outbox_depth
        self._on_commit = on_commit
        self._lock = threading.Lock()

    def run(self, rule: Rule, tick_ms: int) -> TickOutcome:
        """Evaluate and record `rule` at `tick_ms`, or return what was recorded for it before.

        Raises StoreError (retryable) when the commit fails; then nothing was recorded.
        """
        with self._lock:
            existing = self._alerts.get_tick(rule.id, tick_ms)
            if existing is not None:
                return TickOutcome(self._alerts.alerts_of(existing), new=False)
            started = self._clock.monotonic()
            try:
                evaluation = evaluate(rule, tick_ms, self._reader)
            except Exception:
                self._metrics.evaluations.labels(rule=rule.id, outcome="error").inc()
                raise
            events = [risk_event(f) for f in evaluation.findings]
            deliveries = []
            overflow = []
            for sink in self._sinks:
                room = sink.max_queue - self._outbox_depth(sink.name)
                for event in events:
                    if not sink_wants(sink, event):
                        continue
                    item = (sink.name, event.id, event.body)
                    if room > 0:
                        deliveries.append(item)
                        room -= 1
                    else:
                        overflow.append(item)
            if overflow:
                log.error(
                    "outbox full: alerts dead-lettered at once; redrive when the sink recovers",
                    alerts=len(overflow),
                )
                for sink_name, _, _ in overflow:
                    self._metrics.outbox_full.labels(sink=sink_name).inc()
            record = TickRecord(
                rule.id,
                tick_ms,
                tuple(e.id for e in events),
                self._clock.now_ms(),
                evaluation.excluded,
            )
            self._alerts.commit_tick(
                record, [(e.id, e.time_ms, e.body) for e in events], deliveries, overflow
            )
            elapsed = self._clock.monotonic() - started
        m = self._metrics
        m.evaluations.labels(rule=rule.id, outcome="ok").inc()
        m.evaluation_seconds.labels(rule=rule.id).observe(elapsed)
        m.alerts.labels(rule=rule.id).inc(len(events))
        m.alerts_excluded.labels(rule=rule.id).inc(evaluation.excluded)
        m.last_tick.labels(rule=rule.id).set(tick_ms / 1000)
        log.info(
            "rule evaluated",
            rule=rule.id,
            tick=tick_ms,
            alerts=len(events),
            excluded=evaluation.excluded,
            candidates=evaluation.candidates,
            seconds=round(elapsed, 4),
        )
        if deliveries:
            self._on_commit()
        return TickOutcome([e.body for e in events], new=True)
