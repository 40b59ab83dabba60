"""Rule: one detection. Values only; evaluation lives in the engine."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from functools import cached_property

from pathwatch.observations import KeyTuple

HOST_FIELD = "host.name"
CLUSTER_FIELD = "k8s.cluster.name"
PATH_FIELD = "process.executable.path"


@dataclass(frozen=True)
class Exclusion:
    """Drops alerts whose key field `field` matches: exactly (value), by glob, or by regex."""

    field: str
    kind: str  # "value", "glob" or "regex"
    pattern: str

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        if self.kind == "regex":
            return re.compile(self.pattern)
        return re.compile(fnmatch.translate(self.pattern))

    def matches(self, value: str) -> bool:
        if self.kind == "value":
            return value == self.pattern
        if self.kind == "regex":
            return self._regex.search(value) is not None
        return self._regex.match(value) is not None


@dataclass(frozen=True)
class Risk:
    """Risk attribution of an alert, as in Splunk RBA: score = impact x confidence / 100."""

    impact: int = 50
    confidence: int = 50
    message: str = "Kubernetes Process Running From New Path on host $host$"
    object_field: str = HOST_FIELD
    object_type: str = "system"

    @property
    def score(self) -> int:
        return self.impact * self.confidence // 100


@dataclass(frozen=True)
class Rule:
    """A first-seen detection over keys made of resource attributes.

    At tick T it alerts each key observed in [T - window, T) and not in [T - baseline, T - window).
    `window_minutes` and `baseline_minutes` are whole minutes; the schedule is a 5-field cron
    expression evaluated in UTC; `delay_seconds` lets late data arrive before a tick runs.
    """

    id: str
    name: str
    search_name: str
    key_fields: tuple[str, ...]
    metrics: tuple[str, ...] = ("process.*",)
    window_minutes: int = 60
    baseline_minutes: int = 30 * 24 * 60
    schedule: str = "0 * * * *"
    delay_seconds: float = 60.0
    enabled: bool = True
    mode: str = "schedule"  # "schedule", or "stream": also alert as soon as a new key arrives
    # A cluster without any observation before the window: one summary ("summarize") or an
    # alert per key ("alert", the reference's behaviour).
    no_baseline: str = "summarize"
    learning_period_minutes: int = 0  # a host or cluster younger than this raises no alert
    warmup_minutes: int = 0  # no alerts until this long after the data dir's first start
    suppress_for_minutes: int = 0  # one alert per (host, executable path) within this
    risk: Risk = field(default_factory=Risk)
    exclude: tuple[Exclusion, ...] = ()
    mitre_technique_ids: tuple[str, ...] = ("T1204",)
    mitre_techniques: tuple[str, ...] = ("User Execution",)
    mitre_tactic_ids: tuple[str, ...] = ("TA0002",)
    mitre_tactics: tuple[str, ...] = ("Execution",)
    analytic_stories: tuple[str, ...] = ("Risk Based Analytics (RBA)",)

    @property
    def horizon_minutes(self) -> int:
        """How far back observations matter: baseline plus one day of margin."""
        return self.baseline_minutes + 24 * 60

    def excluded_by(self, key: KeyTuple) -> Exclusion | None:
        values = dict(zip(self.key_fields, key, strict=True))
        for exclusion in self.exclude:
            name = HOST_FIELD if exclusion.field == "host" else exclusion.field
            value = values.get(name)
            if value is not None and exclusion.matches(value):
                return exclusion
        return None

    def field_value(self, key: KeyTuple, name: str) -> str | None:
        try:
            return key[self.key_fields.index(name)]
        except ValueError:
            return None

    def suppression_key(self, key: KeyTuple) -> tuple[str, ...]:
        """What suppress_for groups by: (host, executable path) when the key has them."""
        parts = [self.field_value(key, f) for f in (HOST_FIELD, PATH_FIELD)]
        if all(p is not None for p in parts):
            return tuple(p for p in parts if p is not None)
        return key

    def metric_matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.metrics)
