"""evaluate: the first-seen rule at tick T, over any PresenceReader.

At T (a whole minute), a key is new when it was observed in ``[T - window, T)`` and not in
``[T - baseline, T - window)``: start inclusive, end exclusive, exactly as the reference search.
Only observations that arrived on time count as baseline (receiver.max_baseline_lateness): a
backdated point can make a key new, never hide one. With every point on time (or a lateness of
0s) this is the reference rule exactly.

`late_findings` checks keys that received minutes after the tick of their window had run: each
late onset is reported once, at the tick whose window holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, cast

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
    late: bool = False  # found after its tick had run (late data)

    @property
    def late_history(self) -> bool:
        """Was the key observed in the baseline only by points that arrived late?"""
        rule, tick = self.rule, self.tick_ms // MINUTE_MS
        start, end = tick - rule.baseline_minutes, tick - rule.window_minutes
        return self.state.untrusted.observed(start, end)


@dataclass(slots=True)
class Evaluation:
    findings: list[Finding] = field(default_factory=list)
    excluded: int = 0
    candidates: int = 0


def evaluate(rule: Rule, tick_ms: int, reader: PresenceReader) -> Evaluation:
    """Findings of `rule` at `tick_ms` (must be minute-aligned), in key order.

    Reads only the keys the store's indexes name for the window (see _candidates).
    """
    if tick_ms % MINUTE_MS:
        raise ValueError("evaluation time must be a whole minute")
    tick = tick_ms // MINUTE_MS
    window_start = tick - rule.window_minutes
    baseline_start = tick - rule.baseline_minutes
    out = Evaluation()
    for key, state in _candidates(rule, reader, window_start, tick, baseline_start):
        out.candidates += 1
        history = state.history
        first = history.first_in(window_start, tick)
        if first is None or state.trusted_observed(baseline_start, window_start):
            continue
        if rule.excluded_by(key) is not None:
            out.excluded += 1
            continue
        out.findings.append(Finding(rule, tick_ms, key, state, first))
    out.findings.sort(key=lambda f: f.key)
    return out


def _candidates(
    rule: Rule, reader: PresenceReader, window_start: int, tick: int, baseline_start: int
) -> Iterator[tuple[KeyTuple, KeyState]]:
    """The keys to check, as few as the reader can name.

    A new key's first minute in the window starts a run that follows the previous run by at
    least baseline - window minutes (nothing in the baseline), so a reader with an onset index
    (the RocksDB store) names just those: the cost follows the new keys. Otherwise, keys active
    in the window, leaving out those first seen in the baseline where the reader can.
    """
    onsets = getattr(reader, "new_candidates", None)
    if onsets is not None:
        found = onsets(rule.id, window_start, tick, window_start - baseline_start)
        if found is not None:
            return cast("Iterator[tuple[KeyTuple, KeyState]]", found)
    narrow = getattr(reader, "active_except_first_seen", None)
    if narrow is not None:
        # A key first seen inside the baseline was observed in the baseline: it cannot be new.
        return cast(
            "Iterator[tuple[KeyTuple, KeyState]]",
            narrow(rule.id, window_start, tick, baseline_start, window_start),
        )
    return reader.active(rule.id, window_start, tick)


def late_findings(
    rule: Rule,
    key: KeyTuple,
    state: KeyState,
    since_minute: int,
    through_ms: int,
    tick_of: Callable[[int], int],
) -> list[Finding]:
    """Onsets of `key` at or after `since_minute` (its earliest late minute) in windows of
    ticks up to `through_ms`, each at the tick whose window holds it (`tick_of(minute)`: the
    first scheduled tick after the minute).

    An onset is the start of a run of observations (nothing the minute before) that is new at
    its tick by the rule; the alert id is the one an on-time evaluation gives it.
    """
    onsets = late_onsets(rule, state, since_minute, through_ms, tick_of)
    if not onsets or rule.excluded_by(key) is not None:
        return []
    return [Finding(rule, tick_ms, key, state, first, late=True) for tick_ms, first in onsets]


def late_onsets(
    rule: Rule,
    state: KeyState,
    since_minute: int,
    through_ms: int,
    tick_of: Callable[[int], int],
) -> list[tuple[int, int]]:
    """`late_findings` before the rule's exclusions, as (tick ms, first minute) pairs: what
    the key's history decides, so a caller holding only the record can skip decoding its key.

    `tick_of` must not decrease (the first scheduled tick after a later minute is no earlier):
    the runs are visited in order and the first one past `through_ms` ends the search.
    """
    out: list[tuple[int, int]] = []
    history = state.history
    for start in history.run_starts(since_minute):
        tick_ms = tick_of(start)
        if tick_ms > through_ms:
            break
        tick = tick_ms // MINUTE_MS
        window_start = tick - rule.window_minutes
        if start < window_start:
            continue  # between windows: no tick covers it, as in the reference
        first = history.first_in(window_start, tick)
        if first != start:
            continue  # the occurrence started earlier in the same window
        if state.trusted_observed(tick - rule.baseline_minutes, window_start):
            continue
        out.append((tick_ms, first))
    return out
