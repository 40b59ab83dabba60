"""NewKeyGuard: caps how many new keys a host (and the whole fleet) may create per hour.

A compromised node can invent process keys without end (random paths, pids) to bloat the store
and drown the security team in alerts. Past a cap, new keys are accepted but not tracked, and the
guard reports the first refusal per host and hour so that one summary alert replaces the flood.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HOUR_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class LimitHit:
    """The first refused new key of `host` (or of the fleet, host None) in the hour."""

    rule_id: str
    host: str | None
    hour_ms: int
    limit: int


@dataclass(slots=True)
class NewKeyGuard:
    """Counts admitted new keys per (rule, host) and per rule in the current wall-clock hour.

    Memory is bounded: entries exist only for admitted keys, at most `per_hour` per rule.
    A limit of 0 disables that cap.
    """

    per_host_per_hour: int = 0
    per_hour: int = 0
    _hour: int = -1
    _host_counts: dict[tuple[str, str], int] = field(default_factory=dict)
    _rule_counts: dict[str, int] = field(default_factory=dict)
    _reported: set[tuple[str, str | None]] = field(default_factory=set)
    refused: int = 0

    def admit(self, rule_id: str, host: str, now_ms: int) -> LimitHit | bool | None:
        """True to track the new key; otherwise the LimitHit to report (first refusal in the
        hour for that host or for the fleet), or False when that was reported already."""
        hour = now_ms // HOUR_MS
        if hour != self._hour:
            self._hour = hour
            self._host_counts.clear()
            self._rule_counts.clear()
            self._reported.clear()
        if self.per_hour and self._rule_counts.get(rule_id, 0) >= self.per_hour:
            return self._refuse(rule_id, None, self.per_hour)
        host_key = (rule_id, host)
        if self.per_host_per_hour and self._host_counts.get(host_key, 0) >= self.per_host_per_hour:
            return self._refuse(rule_id, host, self.per_host_per_hour)
        self._host_counts[host_key] = self._host_counts.get(host_key, 0) + 1
        self._rule_counts[rule_id] = self._rule_counts.get(rule_id, 0) + 1
        return True

    def _refuse(self, rule_id: str, host: str | None, limit: int) -> LimitHit | bool:
        self.refused += 1
        if (rule_id, host) in self._reported:
            return False
        self._reported.add((rule_id, host))
        return LimitHit(rule_id, host, self._hour * HOUR_MS, limit)
