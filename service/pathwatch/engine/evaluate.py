"""evaluate: the first-seen rule at tick T, over any PresenceReader.

At T (a whole minute), a key is new when it was observed in ``[T - window, T)`` and not in
``[T - baseline, T - window)``: start inclusive, end exclusive, exactly as the reference search.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from pathwatch.clock import MINUTE_MS
from pathwatch.observations import KeyTuple
from pathwatch.rules.model import Rule
from pathwatch.store.codec import KeyState


class PresenceReader(Protocol):
    def active(
        self, rule: str, start_min: int, end_min: int
    ) -> Iterator[tuple[KeyTuple, KeyState]]:
        """At least every key observed in [start_min, end_min); callers re-check histories."""
        ...


@dataclass(frozen=True, slots=True)
class Finding:
    """A key the rule reports at `tick_ms`; `first_minute`: its first minute in the window."""

    rule: Rule
    tick_ms: int
    key: KeyTuple
    state: KeyState
    first_minute: int


@dataclass(slots=True)
class Evaluation:
    findings: list[Finding] = field(default_factory=list)
    excluded: int = 0
    candidates: int = 0


def evaluate(rule: Rule, tick_ms: int, reader: PresenceReader) -> Evaluation:
    """Findings of `rule` at `tick_ms` (must be minute-aligned), in key order.

    Reads only keys the activity index lists for the window: the cost follows active keys.
    """
    if tick_ms % MINUTE_MS:
        raise ValueError("evaluation time must be a whole minute")
    tick = tick_ms // MINUTE_MS
    window_start = tick - rule.window_minutes
    baseline_start = tick - rule.baseline_minutes
    out = Evaluation()
    # A key first seen inside the baseline was observed in the baseline: it cannot be new.
    # Readers that can filter on that before decoding (the RocksDB store) are asked to.
    narrow = getattr(reader, "active_except_first_seen", None)
    candidates = (
        narrow(rule.id, window_start, tick, baseline_start, window_start)
        if narrow is not None
        else reader.active(rule.id, window_start, tick)
    )
    for key, state in candidates:
        out.candidates += 1
        history = state.history
        first = history.first_in(window_start, tick)
        if first is None or history.observed(baseline_start, window_start):
            continue
        if rule.excluded_by(key) is not None:
            out.excluded += 1
            continue
        out.findings.append(Finding(rule, tick_ms, key, state, first))
    out.findings.sort(key=lambda f: f.key)
    return out
