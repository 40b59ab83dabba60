"""PresenceHistory: the minutes in which one key was observed, as merged runs.

A history is a sorted tuple of half-open runs ``[start, end)`` of minutes since the Unix epoch,
never overlapping and never touching (adjacent runs are merged). A process scraped every 10 s for
30 days without a gap is one run, so the record does not grow with the number of scrapes.

Answers are exact at minute resolution while a key has at most ``max_runs`` separate runs inside
the retention horizon. Past that, the two runs separated by the smallest gap are joined (the gap
is then reported as observed); the bound keeps a flapping key from growing without limit.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

Run = tuple[int, int]


@dataclass(frozen=True, slots=True)
class PresenceHistory:
    """Immutable set of observed minutes, stored as runs; see the module docstring."""

    runs: tuple[Run, ...] = ()

    @classmethod
    def of_minutes(cls, minutes: Iterable[int]) -> PresenceHistory:
        return cls().with_minutes(minutes)

    def with_minutes(self, minutes: Iterable[int]) -> PresenceHistory:
        """A history that also contains `minutes` (any order, duplicates allowed)."""
        new = sorted(set(minutes))
        if not new:
            return self
        added: list[Run] = []
        start = prev = new[0]
        for m in new[1:]:
            if m != prev + 1:
                added.append((start, prev + 1))
                start = m
            prev = m
        added.append((start, prev + 1))
        if not self.runs:
            return PresenceHistory(tuple(added))
        return PresenceHistory(_merge(self.runs, added))

    def contains_all(self, minutes: Iterable[int]) -> bool:
        """True when every one of `minutes` is already recorded (a write would change nothing)."""
        runs = self.runs
        if not runs:
            return not any(True for _ in minutes)
        # Hot path of ingest: a running process's scrape falls in its latest run.
        last_start, last_end = runs[-1]
        for m in minutes:
            if not last_start <= m < last_end and not self.observed(m, m + 1):
                return False
        return True

    def observed(self, start: int, end: int) -> bool:
        """Was the key observed in any minute of ``[start, end)``?"""
        if start >= end or not self.runs:
            return False
        # The last run starting before `end` is the only candidate that can overlap.
        i = bisect_right(self.runs, (end - 1, _INF)) - 1
        return i >= 0 and self.runs[i][1] > start

    def first_in(self, start: int, end: int) -> int | None:
        """The earliest observed minute in ``[start, end)``, or None."""
        if start >= end:
            return None
        for run_start, run_end in self.runs:
            if run_end <= start:
                continue
            if run_start >= end:
                return None
            return max(run_start, start)
        return None

    def union(self, other: PresenceHistory) -> PresenceHistory:
        if not other.runs:
            return self
        if not self.runs:
            return other
        return PresenceHistory(_merge(self.runs, other.runs))

    def without(self, other: PresenceHistory) -> PresenceHistory:
        """The minutes of this history that `other` does not hold."""
        if not self.runs or not other.runs:
            return self
        out: list[Run] = []
        cut = other.runs
        j = 0
        for start, end in self.runs:
            s = start
            while j < len(cut) and cut[j][1] <= s:
                j += 1
            k = j
            while s < end and k < len(cut) and cut[k][0] < end:
                c_start, c_end = cut[k]
                if c_start > s:
                    out.append((s, c_start))
                s = max(s, c_end)
                k += 1
            if s < end:
                out.append((s, end))
        return PresenceHistory(tuple(out))

    def observed_outside(self, start: int, end: int, other: PresenceHistory) -> bool:
        """Was the key observed in ``[start, end)`` at a minute that `other` does not hold?"""
        if not other.runs:
            return self.observed(start, end)
        if not self.observed(start, end):
            return False
        clipped = PresenceHistory(
            tuple((max(s, start), min(e, end)) for s, e in self.runs if s < end and e > start)
        )
        return bool(clipped.without(other).runs)

    def run_starts(self, since: int) -> list[int]:
        """Starts of runs at or after `since`."""
        return [s for s, _ in self.runs if s >= since]

    @property
    def first_minute(self) -> int | None:
        return self.runs[0][0] if self.runs else None

    @property
    def last_minute(self) -> int | None:
        return self.runs[-1][1] - 1 if self.runs else None

    def trimmed(self, before: int, max_runs: int) -> PresenceHistory:
        """Drop minutes before `before`, then join the closest runs until at most `max_runs`."""
        runs = [(max(s, before), e) for s, e in self.runs if e > before]
        while len(runs) > max(1, max_runs):
            gaps = [runs[i + 1][0] - runs[i][1] for i in range(len(runs) - 1)]
            i = gaps.index(min(gaps))
            runs[i : i + 2] = [(runs[i][0], runs[i + 1][1])]
        return PresenceHistory(tuple(runs))


_INF = 1 << 62


def new_onsets(old: PresenceHistory, new: PresenceHistory, min_gap: int, floor: int) -> list[int]:
    """Onsets that `new` has and `old` had not: starts of runs at or after `floor` that begin
    the history or follow the previous run's end by at least `min_gap` minutes.

    `new` must contain `old` (observations are only added). A start that was already a start
    in `old` is left out: its onset was decided when it was written, and later additions can
    only shorten the gap before it. So the onsets returned over a key's writes include every
    onset of its final history (the onset index is a superset; evaluation re-checks).
    """
    runs = new.runs
    if not runs or (
        len(runs) == len(old.runs) and runs[-1][0] == old.runs[-1][0] and runs[:-1] == old.runs[:-1]
    ):
        return []  # hot path: only the latest run grew, at its end; no run start moved
    old_starts = {s for s, _ in old.runs}
    out: list[int] = []
    prev_end: int | None = None
    for start, end in runs:
        if (
            start >= floor
            and start not in old_starts
            and (prev_end is None or start - prev_end >= min_gap)
        ):
            out.append(start)
        prev_end = end
    return out


def _merge(a: Iterable[Run], b: Iterable[Run]) -> tuple[Run, ...]:
    out: list[Run] = []
    for s, e in sorted([*a, *b]):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return tuple(out)
