"""NewKeyGuard: caps how many new keys a sender may create per hour, per host and overall.

A compromised pod can invent process keys without end (random paths, pids, host names) to bloat
the store and drown the security team in alerts. Every budget is charged to the sender (the
client address, or its certificate identity under mTLS) so that one sender cannot use up a
host's budget, or the fleet's, for the honest collectors:

- per (sender, host): `per_host_per_hour`;
- per sender, over all the hosts it writes for: `per_sender_per_hour`;
- per rule, the whole fleet: `per_hour` (the last line of defence against many senders).

Past a cap, the data is accepted but the new key is not tracked. The guard reports the first
refusal per scope and hour (one summary alert each, at once), and the store lists every refused
key so that the next tick's summary names them: a cap can delay a key's alert, never hide it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HOUR_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class LimitHit:
    """The first refused new key of a scope in the hour: `host` (with its sender) for the
    per-host cap, `sender` alone for the per-sender cap, neither for the fleet cap."""

    rule_id: str
    host: str | None
    hour_ms: int
    limit: int
    sender: str | None = None

    @property
    def scope(self) -> str:
        if self.host is not None:
            return "host"
        return "sender" if self.sender is not None else "fleet"


@dataclass(slots=True)
class NewKeyGuard:
    """Counts admitted new keys per scope in the current wall-clock hour.

    Memory is bounded: entries exist only for admitted keys, so at most `per_hour` per rule
    (or one per admitted key when that cap is off). A limit of 0 disables that cap.
    """

    per_host_per_hour: int = 0
    per_hour: int = 0
    per_sender_per_hour: int = 0
    _hour: int = -1
    _host_counts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    _sender_counts: dict[tuple[str, str], int] = field(default_factory=dict)
    _rule_counts: dict[str, int] = field(default_factory=dict)
    _reported: set[tuple[str, str | None, str | None]] = field(default_factory=set)
    refused: int = 0

    def admit(
        self, rule_id: str, host: str, now_ms: int, sender: str = ""
    ) -> LimitHit | bool | None:
        """True to track the new key; otherwise the LimitHit to report (first refusal in the
        hour for that scope), or False when that was reported already."""
        hour = now_ms // HOUR_MS
        if hour != self._hour:
            self._hour = hour
            self._host_counts.clear()
            self._sender_counts.clear()
            self._rule_counts.clear()
            self._reported.clear()
        host_key = (rule_id, sender, host)
        if self.per_host_per_hour and self._host_counts.get(host_key, 0) >= self.per_host_per_hour:
            return self._refuse(rule_id, host, sender, self.per_host_per_hour)
        sender_key = (rule_id, sender)
        if (
            self.per_sender_per_hour
            and self._sender_counts.get(sender_key, 0) >= self.per_sender_per_hour
        ):
            return self._refuse(rule_id, None, sender, self.per_sender_per_hour)
        if self.per_hour and self._rule_counts.get(rule_id, 0) >= self.per_hour:
            return self._refuse(rule_id, None, None, self.per_hour)
        self._host_counts[host_key] = self._host_counts.get(host_key, 0) + 1
        self._sender_counts[sender_key] = self._sender_counts.get(sender_key, 0) + 1
        self._rule_counts[rule_id] = self._rule_counts.get(rule_id, 0) + 1
        return True

    def _refuse(
        self, rule_id: str, host: str | None, sender: str | None, limit: int
    ) -> LimitHit | bool:
        self.refused += 1
        scope = (rule_id, host, sender)
        if scope in self._reported:
            return False
        self._reported.add(scope)
        return LimitHit(rule_id, host, self._hour * HOUR_MS, limit, sender)
