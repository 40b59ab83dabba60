"""AlertGates: the policies between a finding and a delivered alert, applied in one place.

In order: warm-up after a fresh install, learning periods of new hosts and clusters,
deduplication by alert id (stream and schedule never alert the same occurrence twice), and
suppression of repeats for the same (host, executable path). Each gated alert is counted by
reason in ``pathwatch_alerts_gated_total``; none is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pathwatch.alerts.event import RiskEvent
from pathwatch.clock import MINUTE_MS
from pathwatch.engine.evaluate import Finding
from pathwatch.rules.model import CLUSTER_FIELD, HOST_FIELD, Rule
from pathwatch.store import keyspace as ks
from pathwatch.store.alertlog import AlertStore
from pathwatch.store.codec import encode_key
from pathwatch.telemetry.metrics import Metrics

EntityFirstSeen = Callable[[str, str], "int | None"]


@dataclass(slots=True)
class GateResult:
    kept: list[RiskEvent] = field(default_factory=list)
    extra: list[tuple[bytes, bytes]] = field(default_factory=list)  # suppression records


class AlertGates:
    def __init__(
        self,
        alerts: AlertStore,
        entity_first_seen: EntityFirstSeen,
        first_start_ms: int,
        metrics: Metrics,
    ) -> None:
        self._alerts = alerts
        self._entities = entity_first_seen
        self._first_start_ms = first_start_ms
        self._metrics = metrics

    def in_warmup(self, rule: Rule, at_ms: int) -> bool:
        return bool(rule.warmup_minutes) and (
            at_ms < self._first_start_ms + rule.warmup_minutes * MINUTE_MS
        )

    def _learning(self, rule: Rule, key: tuple[str, ...], at_ms: int) -> bool:
        if not rule.learning_period_minutes:
            return False
        limit = rule.learning_period_minutes * MINUTE_MS
        for kind, name in (("h", HOST_FIELD), ("c", CLUSTER_FIELD)):
            value = rule.field_value(key, name)
            if value is None:
                continue
            first = self._entities(kind, value)
            if first is None or at_ms - first < limit:
                return True
        return False

    def apply(
        self, rule: Rule, pairs: Sequence[tuple[Finding, RiskEvent]], at_ms: int
    ) -> GateResult:
        """The alerts that pass, and the records to commit with them."""
        out = GateResult()
        if not pairs:
            return out
        counter = self._metrics.alerts_gated
        if self.in_warmup(rule, at_ms):
            counter.labels(rule=rule.id, reason="warmup").inc(len(pairs))
            return out
        existing = set(self._alerts.existing([e.id for _, e in pairs]))
        seen_now: dict[bytes, int] = {}
        for finding, event in pairs:
            # Recorded before, or twice in this batch (a tick at any minute and a late onset
            # of an hourly tick can name the same occurrence): one alert per id, always.
            if event.id in existing:
                counter.labels(rule=rule.id, reason="duplicate").inc()
                continue
            existing.add(event.id)
            if self._learning(rule, finding.key, at_ms):
                counter.labels(rule=rule.id, reason="learning").inc()
                continue
            if rule.suppress_for_minutes:
                skey = encode_key(rule.suppression_key(finding.key))
                last = seen_now.get(skey) or self._alerts.last_suppressed(rule.id, skey)
                if last is not None and at_ms - last < rule.suppress_for_minutes * MINUTE_MS:
                    counter.labels(rule=rule.id, reason="suppressed").inc()
                    continue
                seen_now[skey] = at_ms
                out.extra.append((ks.suppression_key(rule.id, skey), ks.u64(at_ms)))
            out.kept.append(event)
        return out
