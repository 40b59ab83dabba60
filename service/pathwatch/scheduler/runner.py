"""TickRunner: evaluates one rule at one tick and commits the tick, its alerts and deliveries.

Used by the scheduler and by the evaluate API alike, so both run a tick exactly the same way. A
tick already recorded is never evaluated again: its stored alerts are returned instead. A tick
runs only once its window plus the rule's delay has passed (TickNotReady otherwise).

Each tick also settles what arrived since the previous one and no evaluation saw: keys that
got minutes inside windows of ticks that had already run (late onsets, alerted now with the id
they would have had, marked late) and keys the new-key caps refused (one summary listing them).
The entries it settles are deleted in the same write as the tick.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from pathwatch.alerts.context import Explainer
from pathwatch.alerts.event import (
    RiskEvent,
    alert_id,
    flood_event,
    late_risk_event,
    no_baseline_event,
    refused_keys_event,
    rfc3339,
    risk_event,
)
from pathwatch.alerts.gates import AlertGates
from pathwatch.alerts.suspicious import suspicion
from pathwatch.clock import MINUTE_MS, Clock
from pathwatch.config.model import SinkConfig
from pathwatch.engine.evaluate import Finding, PresenceReader, evaluate, late_onsets
from pathwatch.rules.model import CLUSTER_FIELD, HOST_FIELD, PATH_FIELD, Rule
from pathwatch.store.alertlog import AlertStore, TickRecord
from pathwatch.store.context import ContextMemo
from pathwatch.store.firstseen import FirstSeenStore, StreamHit
from pathwatch.store.writer import TickWatermarks
from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="scheduler")


@dataclass(frozen=True, slots=True)
class TickOutcome:
    alerts: list[dict[str, Any]]
    new: bool  # False when the tick had been recorded before (nothing was evaluated or queued)
    dry_run: bool = False  # evaluated now, nothing recorded or delivered


def _suspicion_of(event: RiskEvent) -> int:
    return suspicion(str(event.body.get("fields", {}).get(PATH_FIELD, "")))


class TickNotReady(ValueError):
    """The tick's window plus the rule's delay has not passed: data may still arrive for it.
    Permanent for this call (the API answers 400); the scheduler never asks that early."""


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
        max_alerts_per_tick: int = 0,
        gates: AlertGates | None = None,
        explainer: Explainer | None = None,
        ledger: FirstSeenStore | None = None,
        watermarks: TickWatermarks | None = None,
        next_tick: Callable[[str, int], int] | None = None,
    ) -> None:
        # The late and refused-key entries live in the first-seen store (`ledger`); without
        # one, ticks settle nothing (pure evaluation, as in unit tests).
        self._ledger = ledger
        self._watermarks = watermarks or TickWatermarks()
        self._next_tick = next_tick
        # Per rule, the clusters the last tick found without baseline (for /api/v1/rules).
        self.clusters_without_baseline: dict[str, list[str]] = {}
        self._max_alerts = max_alerts_per_tick
        self._gates = gates
        self._explainer = explainer
        self._reader = reader
        self._alerts = alerts
        self._sinks = list(sinks)
        self._clock = clock
        self._metrics = metrics
        self._outbox_depth = outbox_depth
        self._on_commit = on_commit
        self._lock = threading.Lock()

    def _route(
        self, events: Sequence[RiskEvent]
    ) -> tuple[list[tuple[str, str, dict[str, Any]]], list[tuple[str, str, dict[str, Any]]]]:
        """(deliveries, overflow): each event for each sink that wants it; past a sink's
        outbox bound, into overflow (dead-lettered at once, reported)."""
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
        return deliveries, overflow

    def _explain(self, events: Sequence[RiskEvent], findings: Sequence[Finding]) -> None:
        """Attach `context` to each event (best effort: a failure leaves it out)."""
        if self._explainer is None or not events:
            return
        by_id = {alert_id(f.rule.id, f.key, f.first_minute): f for f in findings}
        memo: ContextMemo = {}
        for event in events:
            finding = by_id.get(event.id)
            if finding is None:
                continue
            try:
                event.body["context"] = self._explainer.explain(finding, memo)
            except Exception:
                log.exception("cannot build alert context", alert_id=event.id)

    def publish(
        self, events: Sequence[RiskEvent], extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Record and deliver alerts that belong to no tick (stream mode, flood summaries).

        Raises StoreError (retryable) when the commit fails.
        """
        if not events:
            return
        with self._lock:
            deliveries, overflow = self._route(events)
            self._alerts.commit_tick(
                None,
                [(e.id, e.time_ms, e.body) for e in events],
                deliveries,
                overflow,
                now_ms=self._clock.now_ms(),
                extra=extra,
            )
        for e in events:
            self._metrics.alerts.labels(rule=e.rule_id).inc()
            log.warning("alert", rule=e.rule_id, kind=e.body.get("kind", "stream"),
                        risk_object=e.body["risk_object"], alert_id=e.id)  # fmt: skip
        self._on_commit()

    def stream(self, rules: dict[str, Rule], hits: Sequence[StreamHit]) -> None:
        """Alert keys that just started a new occurrence (rules in stream mode).

        The id is the one the scheduled evaluation computes for the same occurrence, so the
        hourly tick (which still runs, as a safety net for late data) never alerts it again.
        """
        now = self._clock.now_ms()
        by_rule: dict[str, list[tuple[Finding, RiskEvent]]] = {}
        for hit in hits:
            rule = rules[hit.rule_id]
            if rule.excluded_by(hit.key) is not None:
                self._metrics.alerts_excluded.labels(rule=rule.id).inc()
                continue
            tick = (hit.first_minute + 1) * MINUTE_MS
            finding = Finding(rule, tick, hit.key, hit.state, hit.first_minute)
            event = risk_event(finding)
            event.body["mode"] = "stream"
            event.body["window"] = {
                "start": rfc3339(hit.first_minute * MINUTE_MS),
                "end": rfc3339(tick),
            }
            by_rule.setdefault(rule.id, []).append((finding, event))
        for rule_id, pairs in by_rule.items():
            rule = rules[rule_id]
            kept, extra = [e for _, e in pairs], []
            if self._gates is not None:
                gated = self._gates.apply(rule, pairs, now)
                kept, extra = gated.kept, gated.extra
            self._explain(kept, [f for f, _ in pairs])
            self.publish(kept, extra)
            self._metrics.stream_alerts.labels(rule=rule_id).inc(len(kept))

    def run(self, rule: Rule, tick_ms: int, *, dry_run: bool = False) -> TickOutcome:
        """Evaluate and record `rule` at `tick_ms`, or return what was recorded for it before.

        Past `max_alerts_per_tick`, the remaining alerts are recorded (listed by the API) but
        not delivered; one summary alert, listing them, is delivered in their place, and the
        most suspicious paths are the ones delivered one by one. A cluster without any
        observation before the window gets one `no_baseline` summary instead of an alert per
        key (unless the rule says `no_baseline: alert`).
        With `dry_run`, answers what the tick would report now, at any minute, and records,
        consumes and delivers nothing.
        Raises TickNotReady when the window plus the rule's delay has not passed, StoreError
        (retryable) when the commit fails; then nothing was recorded.
        """
        with self._lock:
            existing = self._alerts.get_tick(rule.id, tick_ms)
            if existing is not None:
                return TickOutcome(self._alerts.alerts_of(existing), new=False)
            ready_ms = tick_ms + int(rule.delay_seconds * 1000)
            if not dry_run and self._clock.now_ms() < ready_ms:
                raise TickNotReady(
                    f"the tick at {rfc3339(tick_ms)} can run from {rfc3339(ready_ms)}: its "
                    f"window ends at the tick and rule {rule.id} waits {rule.delay_seconds:g} s "
                    "for data still on its way (a dry run answers at any time)"
                )
            if not dry_run:
                # From here on, a write that this evaluation may miss lists itself as late.
                self._watermarks.advance(rule.id, tick_ms)
            started = self._clock.monotonic()
            try:
                evaluation = evaluate(rule, tick_ms, self._reader)
                late_generation = self._ledger.late_generation if self._ledger else None
                late, late_seen = self._late(rule, tick_ms, evaluation.findings)
                refused, refused_keys = self._refused(rule, tick_ms)
            except Exception:
                self._metrics.evaluations.labels(rule=rule.id, outcome="error").inc()
                raise
            on_time, no_baseline = self._without_baseline(rule, tick_ms, evaluation.findings)
            # A tick at any minute and a late onset of an hourly tick can name one occurrence.
            named = {alert_id(rule.id, f.key, f.first_minute) for f in evaluation.findings}
            late = [f for f in late if alert_id(rule.id, f.key, f.first_minute) not in named]
            findings = [*on_time, *late]
            events = [risk_event(f) for f in on_time]
            events += [late_risk_event(f, tick_ms) for f in late]
            extra: list[tuple[bytes, bytes]] = []
            if self._gates is not None:
                gated = self._gates.apply(rule, list(zip(findings, events, strict=True)), tick_ms)
                events, extra = gated.kept, gated.extra
            self._explain(events, findings)
            late_kept = sum(1 for e in events if e.body.get("late"))
            deliver = events
            if self._max_alerts and len(events) > self._max_alerts:
                # The ones delivered one by one are the most suspicious; the rest are listed
                # in the summary and stay readable in the alert log.
                events = sorted(events, key=_suspicion_of)
                deliver = [*events[: self._max_alerts],
                           flood_event(rule, tick_ms, events[self._max_alerts :])]  # fmt: skip
                events = [*events, deliver[-1]]
                self._metrics.alerts_summarised.labels(rule=rule.id).inc(len(events) - len(deliver))
            for summary in [*no_baseline, *([refused] if refused is not None else [])]:
                deliver = [*deliver, summary]
                events = [*events, summary]
            if dry_run:
                return TickOutcome([e.body for e in events], new=False, dry_run=True)
            deliveries, overflow = self._route(deliver)
            record = TickRecord(
                rule.id,
                tick_ms,
                tuple(e.id for e in events),
                self._clock.now_ms(),
                evaluation.excluded,
            )
            deletes = list(refused_keys)
            if self._ledger is not None and late_seen:
                # Under the fence: an entry a write changed since it was read stays listed.
                with self._watermarks.lock:
                    deletes += self._ledger.late_unchanged(late_seen, late_generation)
                    self._commit(record, events, deliveries, overflow, extra, deletes)
            else:
                self._commit(record, events, deliveries, overflow, extra, deletes)
            elapsed = self._clock.monotonic() - started
        m = self._metrics
        m.evaluations.labels(rule=rule.id, outcome="ok").inc()
        m.evaluation_seconds.labels(rule=rule.id).observe(elapsed)
        m.alerts.labels(rule=rule.id).inc(len(events))
        m.alerts_excluded.labels(rule=rule.id).inc(evaluation.excluded)
        m.last_tick.labels(rule=rule.id).set(tick_ms / 1000)
        if late_kept:
            m.late_alerts.labels(rule=rule.id).inc(late_kept)
        log.info(
            "rule evaluated",
            rule=rule.id,
            tick=tick_ms,
            alerts=len(events),
            late_alerts=late_kept,
            excluded=evaluation.excluded,
            candidates=evaluation.candidates,
            seconds=round(elapsed, 4),
        )
        if deliveries:
            self._on_commit()
        return TickOutcome([e.body for e in events], new=True)

    def _commit(
        self,
        record: TickRecord,
        events: Sequence[RiskEvent],
        deliveries: list[tuple[str, str, dict[str, Any]]],
        overflow: list[tuple[str, str, dict[str, Any]]],
        extra: Sequence[tuple[bytes, bytes]],
        deletes: Sequence[bytes],
    ) -> None:
        self._alerts.commit_tick(
            record,
            [(e.id, e.time_ms, e.body) for e in events],
            deliveries,
            overflow,
            extra=extra,
            deletes=deletes,
        )

    def _late(
        self, rule: Rule, tick_ms: int, on_time: Sequence[Finding]
    ) -> tuple[list[Finding], list[tuple[bytes, bytes]]]:
        """Late onsets listed since the previous tick, up to this one, that no tick alerted;
        and the late entries read (to delete once committed)."""
        ledger = self._ledger
        if ledger is None or self._next_tick is None:
            return [], []
        entries = ledger.late_entries(rule.id)
        if not entries:
            return [], []
        schedule, next_tick = rule.schedule, self._next_tick
        ticks: dict[int, int] = {}

        def tick_of(minute: int) -> int:
            if minute not in ticks:
                # The first tick after the minute: its window holds it (if any window does).
                ticks[minute] = next_tick(schedule, minute * MINUTE_MS)
            return ticks[minute]

        alerted: dict[int, set[tuple[str, ...]]] = {tick_ms: {f.key for f in on_time}}
        # An onset at or after an entry's minute belongs to a tick no earlier than the one
        # after that minute (ticks only move forward): when that tick is past this one, the
        # key has nothing to report now and its record is not read.
        due = [
            (raw_key, since)
            for raw_key, value in entries
            if tick_of(since := ledger.late_since(value)) <= tick_ms
        ]
        out: list[Finding] = []
        for raw_key, since, state in ledger.late_states(rule.id, due):
            onsets = late_onsets(rule, state, since, tick_ms, tick_of)
            if not onsets:
                continue
            key = ledger.late_key(rule.id, raw_key)
            if rule.excluded_by(key) is not None:
                continue
            for onset_tick, first in onsets:
                if key not in self._alerted_at(rule, onset_tick, alerted):
                    out.append(Finding(rule, onset_tick, key, state, first, late=True))
        return out, entries

    def _alerted_at(
        self, rule: Rule, tick_ms: int, memo: dict[int, set[tuple[str, ...]]]
    ) -> set[tuple[str, ...]]:
        """Keys alerted at a recorded tick (an on-time alert may have another first minute)."""
        if tick_ms not in memo:
            record = self._alerts.get_tick(rule.id, tick_ms)
            keys: set[tuple[str, ...]] = set()
            if record is not None:
                names = ["host" if f == HOST_FIELD else f for f in rule.key_fields]
                for body in self._alerts.alerts_of(record):
                    fields = body.get("fields", {})
                    if all(n in fields for n in names):
                        keys.add(tuple(str(fields[n]) for n in names))
            memo[tick_ms] = keys
        return memo[tick_ms]

    def _without_baseline(
        self, rule: Rule, tick_ms: int, findings: Sequence[Finding]
    ) -> tuple[list[Finding], list[RiskEvent]]:
        """Findings of clusters that have history before the window, and one summary for each
        cluster that has none (its keys become baseline as usual). History replayed or
        imported first counts, so a replay followed by an evaluation is the reference."""
        self.clusters_without_baseline[rule.id] = []
        if (
            rule.no_baseline != "summarize"
            or self._ledger is None
            or CLUSTER_FIELD not in rule.key_fields
        ):
            return list(findings), []
        window_start = tick_ms - rule.window_minutes * MINUTE_MS
        fresh: dict[str, bool] = {}
        kept: list[Finding] = []
        held: dict[str, list[Finding]] = {}
        for f in findings:
            cluster = rule.field_value(f.key, CLUSTER_FIELD) or ""
            if cluster not in fresh:
                first = self._ledger.entity_first_seen("c", cluster)
                fresh[cluster] = first is None or first >= window_start
            if fresh[cluster]:
                held.setdefault(cluster, []).append(f)
            else:
                kept.append(f)
        summaries = []
        for cluster, group in sorted(held.items()):
            listed = [
                (
                    rule.field_value(f.key, HOST_FIELD) or "",
                    rule.field_value(f.key, PATH_FIELD) or "",
                )
                for f in group
            ]
            summaries.append(no_baseline_event(rule, tick_ms, cluster, listed))
        self.clusters_without_baseline[rule.id] = sorted(held)
        self._metrics.clusters_without_baseline.labels(rule=rule.id).set(len(held))
        return kept, summaries

    def _refused(self, rule: Rule, tick_ms: int) -> tuple[RiskEvent | None, list[bytes]]:
        """One summary of the keys new-key caps refused since the previous tick."""
        if self._ledger is None:
            return None, []
        entries = self._ledger.refused_entries(rule.id)
        if not entries:
            return None, []
        listed = []
        for _, key, info in entries:
            host = rule.field_value(key, HOST_FIELD) or ""
            path = rule.field_value(key, PATH_FIELD) or ""
            listed.append((host, path, str(info.get("sender", ""))))
        event = refused_keys_event(rule, tick_ms, listed, len(listed))
        return event, [raw for raw, _, _ in entries]
