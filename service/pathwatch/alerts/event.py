"""RiskEvent: the alert pathwatch emits, as a JSON object shaped like a Splunk RBA risk event.

The id is a pure function of (rule id, key, first minute of the key in the window): evaluating
the same data again, after a crash or through the API, yields the same id, which is what lets
receivers deduplicate deliveries.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pathwatch.alerts.suspicious import display_safe, most_suspicious_first
from pathwatch.clock import MINUTE_MS
from pathwatch.engine.evaluate import Finding
from pathwatch.rules.model import HOST_FIELD, Rule
from pathwatch.store.codec import encode_key

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TOKEN = re.compile(r"\$([A-Za-z0-9_.]+)\$")
# The receiver keeps bytes that are not UTF-8 as \xNN escapes (backslashreplace).
_ESCAPED_BYTE = re.compile(r"\\x[0-9a-f]{2}")
MAX_LISTED = 1000  # keys a summary lists by host and path
PATH_FIELD_NAME = "process.executable.path"


def rfc3339(ms: int) -> str:
    """UTC RFC 3339 with millisecond precision when the instant has any."""
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    if ms % 1000:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> int:
    """Unix ms from an RFC 3339 time with an explicit offset or Z. Raises ValueError."""
    value = text.strip()
    if not value:
        raise ValueError("empty time")
    dt = datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError(f"time {text!r} has no UTC offset (append Z for UTC)")
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def alert_id(rule_id: str, key: tuple[str, ...], first_minute: int) -> str:
    """sha256 over the rule id, the length-prefixed key fields and the minute: unambiguous."""
    h = hashlib.sha256()
    h.update(rule_id.encode())
    h.update(b"\x00")
    h.update(encode_key(key))
    h.update(b"\x00")
    h.update(str(first_minute).encode())
    return h.hexdigest()[:32]


def _field_name(name: str) -> str:
    return "host" if name == HOST_FIELD else name


def render_message(template: str, fields: dict[str, str]) -> str:
    """The template with $field$ tokens replaced by display-safe values."""
    return _TOKEN.sub(
        lambda m: display_safe(fields[m.group(1)]) if m.group(1) in fields else m.group(0),
        template,
    )


@dataclass(frozen=True, slots=True)
class RiskEvent:
    """One alert. `body` is the JSON object sinks deliver."""

    id: str
    rule_id: str
    time_ms: int
    risk_score: int
    body: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(self.body, separators=(",", ":"), sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> RiskEvent:
        body = json.loads(text)
        return cls(
            id=body["id"],
            rule_id=body["rule"]["id"],
            time_ms=parse_rfc3339(body["time"]),
            risk_score=int(body["risk_score"]),
            body=body,
        )


def rule_annotations(rule: Rule) -> dict[str, Any]:
    return {
        "mitre_attack": {
            "mitre_technique_id": list(rule.mitre_technique_ids),
            "mitre_technique": list(rule.mitre_techniques),
            "mitre_tactic_id": list(rule.mitre_tactic_ids),
            "mitre_tactic": list(rule.mitre_tactics),
        },
        "analytic_story": list(rule.analytic_stories),
    }


def risk_event(finding: Finding) -> RiskEvent:
    rule = finding.rule
    fields = {_field_name(n): v for n, v in zip(rule.key_fields, finding.key, strict=True)}
    risk = rule.risk
    event_id = alert_id(rule.id, finding.key, finding.first_minute)
    body: dict[str, Any] = {
        "id": event_id,
        "time": rfc3339(finding.tick_ms),
        "rule": {"id": rule.id, "name": rule.name, "search_name": rule.search_name},
        "window": {
            "start": rfc3339(finding.tick_ms - rule.window_minutes * MINUTE_MS),
            "end": rfc3339(finding.tick_ms),
        },
        "risk_object": fields[_field_name(risk.object_field)],
        "risk_object_type": risk.object_type,
        "risk_score": risk.score,
        "impact": risk.impact,
        "confidence": risk.confidence,
        "risk_message": render_message(risk.message, fields),
        "annotations": rule_annotations(rule),
        "fields": fields,
        "first_seen": rfc3339(finding.state.first_seen_ms),
        "last_seen": rfc3339(finding.state.last_seen_ms),
    }
    escaped = [name for name, value in fields.items() if _ESCAPED_BYTE.search(value)]
    if escaped:
        # The value held bytes that are not UTF-8; they are shown as \xNN.
        body["invalid_utf8_fields"] = escaped
    return RiskEvent(event_id, rule.id, finding.tick_ms, risk.score, body)


def late_risk_event(finding: Finding, reported_ms: int) -> RiskEvent:
    """The alert for an onset found after its tick had run: the id and window of the on-time
    alert it would have been, reported (`time`) at the tick that found it, marked late."""
    event = risk_event(finding)
    event.body["time"] = rfc3339(reported_ms)
    event.body["late"] = True
    event.body["tick"] = rfc3339(finding.tick_ms)
    return RiskEvent(event.id, event.rule_id, reported_ms, event.risk_score, event.body)


def _listing(entries: list[tuple[str, str]]) -> list[dict[str, str]]:
    """(host, path) pairs as listed by summaries: suspicious locations first, at most
    MAX_LISTED."""
    top = most_suspicious_first(entries, lambda e: e[1], MAX_LISTED)
    return [{"host": host, "path": path} for host, path in top]


def _summary_event(
    rule: Rule, kind: str, time_ms: int, risk_object: str, message: str, extra: dict[str, Any]
) -> RiskEvent:
    h = hashlib.sha256(f"{rule.id}\x00{kind}\x00{risk_object}\x00{time_ms}".encode())
    event_id = h.hexdigest()[:32]
    body: dict[str, Any] = {
        "id": event_id,
        "kind": kind,
        "time": rfc3339(time_ms),
        "rule": {"id": rule.id, "name": rule.name, "search_name": rule.search_name},
        "risk_object": risk_object,
        "risk_object_type": rule.risk.object_type,
        "risk_score": rule.risk.score,
        "impact": rule.risk.impact,
        "confidence": rule.risk.confidence,
        "risk_message": message,
        "annotations": rule_annotations(rule),
        "fields": {"host": risk_object},
        **extra,
    }
    return RiskEvent(event_id, rule.id, time_ms, rule.risk.score, body)


def key_limit_event(
    rule: Rule, host: str | None, hour_ms: int, limit: int, sender: str | None = None
) -> RiskEvent:
    """One alert standing in for a flood of new keys that were not tracked. The keys
    themselves are listed by the next tick's `refused_keys_event`."""
    since = rfc3339(hour_ms)
    who = f" from sender {display_safe(sender)}" if sender else ""
    extra: dict[str, Any] = {"limit": limit}
    if sender is not None:
        extra["sender"] = sender
    if host is None and sender is None:
        message = (
            f"New-key limit reached for the whole fleet: over {limit} new keys in the hour "
            f"from {since}; further new keys are not tracked this hour (listed at the next tick)"
        )
        return _summary_event(rule, "new_key_limit", hour_ms, "*", message, extra)
    if host is None:
        message = (
            f"New-key limit reached{who}: over {limit} new keys in the hour from {since}; "
            "further new keys it sends are not tracked this hour (listed at the next tick)"
        )
        return _summary_event(rule, "new_key_limit", hour_ms, f"sender:{sender}", message, extra)
    message = (
        f"New-key limit reached on host {display_safe(host)}{who}: over {limit} new keys in the "
        f"hour from {since}; further new keys from it are not tracked this hour (listed at the "
        "next tick)"
    )
    risk_object = host if not sender else f"{host}\x00{sender}"
    event = _summary_event(rule, "new_key_limit", hour_ms, risk_object, message, extra)
    event.body["risk_object"] = host
    event.body["fields"] = {"host": host}
    return event


def refused_keys_event(
    rule: Rule, tick_ms: int, refused: list[tuple[str, str, str]], total: int
) -> RiskEvent:
    """One alert listing the new keys that new-key caps refused since the previous tick:
    (host, path, sender) each, suspicious locations first. A cap delays such a key's own alert
    (it is not tracked this hour), so this summary is where an analyst sees it."""
    listed = _listing([(host, path) for host, path, _ in refused])
    senders = sorted({sender for _, _, sender in refused if sender})
    message = (
        f"{total} new keys of rule {rule.name} were not tracked (new-key limit); "
        f"listed by host and path, suspicious locations first"
    )
    if listed:
        message += (
            f"; first: {display_safe(listed[0]['path'])} on {display_safe(listed[0]['host'])}"
        )
    extra = {"refused": total, "refused_keys": listed, "senders": senders[:100]}
    return _summary_event(rule, "refused_keys", tick_ms, "*", message, extra)


def no_baseline_event(
    rule: Rule, tick_ms: int, cluster: str, keys: list[tuple[str, str]]
) -> RiskEvent:
    """One alert for a cluster with no observation before the window (a fresh install, or a
    cluster new to this replica): its keys carry no information yet, so they are listed (by
    host and path, suspicious locations first) instead of alerted one by one; they become
    baseline as usual."""
    listed = _listing(keys)
    message = f"No baseline yet for cluster {display_safe(cluster)}: {len(keys)} new keys"
    if listed:
        top = listed[0]
        message += f"; first: {display_safe(top['path'])} on {display_safe(top['host'])}"
    extra = {"cluster": cluster, "new_keys": len(keys), "keys": listed}
    event = _summary_event(rule, "no_baseline", tick_ms, f"cluster:{cluster}", message, extra)
    event.body["risk_object"] = cluster
    event.body["fields"] = {"k8s.cluster.name": cluster}
    return event


def flood_event(rule: Rule, tick_ms: int, suppressed: list[RiskEvent]) -> RiskEvent:
    """One alert summarising the alerts of a tick past the per-tick cap; it lists the held-back
    alerts by host and path (suspicious locations first), and each stays in the alert log."""
    hosts = sorted({e.body["risk_object"] for e in suppressed})
    paths = sorted({e.body["fields"].get(PATH_FIELD_NAME, "") for e in suppressed})
    message = (
        f"{len(suppressed)} more alerts of rule {rule.name} at {rfc3339(tick_ms)} were "
        f"summarised (per-tick cap reached) on {len(hosts)} host(s); see GET /api/v1/alerts"
    )
    extra = {
        "suppressed": len(suppressed),
        "sample_hosts": hosts[:10],
        "sample_paths": most_suspicious_first([p for p in paths if p], str, 10),
        "suppressed_ids": [e.id for e in suppressed[:100]],
        "suppressed_keys": _listing(
            [(e.body["risk_object"], e.body["fields"].get(PATH_FIELD_NAME, "")) for e in suppressed]
        ),
    }
    return _summary_event(rule, "alert_flood", tick_ms, "*", message, extra)
