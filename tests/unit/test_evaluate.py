"""The parity rule at tick T: window [T-1h, T), baseline [T-30d, T-1h), exactly as the reference."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pathwatch.clock import DAY_MS, HOUR_MS, MINUTE_MS
from pathwatch.engine.evaluate import Evaluation, evaluate
from pathwatch.observations import KeyTuple
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.rules.model import Exclusion, Rule
from pathwatch.store.codec import KeyState
from pathwatch.store.presence import PresenceHistory

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=300)

T = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS  # a whole hour, in ms
SECOND_MS = 1000


class MemoryReader:
    """An in-memory PresenceReader: the exact observation times of each key of each rule."""

    def __init__(self, observations: dict[str, dict[KeyTuple, Iterable[int]]]) -> None:
        self.states: dict[str, dict[KeyTuple, KeyState]] = {}
        for rule, keys in observations.items():
            per_rule = self.states.setdefault(rule, {})
            for key, times in keys.items():
                ts = list(times)
                if ts:
                    history = PresenceHistory.of_minutes(t // MINUTE_MS for t in ts)
                    per_rule[key] = KeyState(min(ts), max(ts), history)

    def active(
        self, rule: str, start_min: int, end_min: int
    ) -> Iterator[tuple[KeyTuple, KeyState]]:
        for key, state in self.states.get(rule, {}).items():
            if state.history.observed(start_min, end_min):
                yield key, state


def key(pid: int = 4242, path: str = "/tmp/x", host: str = "node-1") -> KeyTuple:
    return (host, "prod", host, str(pid), path, path.rsplit("/", 1)[-1])


def run(times: dict[KeyTuple, list[int]], rule: Rule = PARITY_RULE, at: int = T) -> Evaluation:
    return evaluate(rule, at, MemoryReader({rule.id: times}))


def alerted(times: dict[KeyTuple, list[int]], rule: Rule = PARITY_RULE, at: int = T) -> set:
    return {f.key for f in run(times, rule, at).findings}


def test_point_exactly_at_window_start_is_current() -> None:
    """A process seen exactly at T-1h is inside the hour evaluated at T and alerts."""
    assert alerted({key(): [T - HOUR_MS]}) == {key()}


def test_point_exactly_at_tick_is_not_current() -> None:
    """A process first seen exactly at T belongs to the next hour: no alert at T."""
    assert alerted({key(): [T]}) == set()
    assert alerted({key(): [T, T + 30 * MINUTE_MS]}) == set()


def test_last_millisecond_before_tick_is_current() -> None:
    """A process seen 1 ms before T alerts at T."""
    assert alerted({key(): [T - 1]}) == {key()}


def test_point_exactly_at_baseline_start_suppresses() -> None:
    """A process seen exactly 30 days before T is known: no alert."""
    assert alerted({key(): [T - 30 * DAY_MS, T - 10 * MINUTE_MS]}) == set()


def test_point_one_second_before_baseline_does_not_suppress() -> None:
    """A process last seen 30 days and 1 s before T is forgotten: it alerts again."""
    assert alerted({key(): [T - 30 * DAY_MS - SECOND_MS, T - 10 * MINUTE_MS]}) == {key()}


def test_point_just_before_window_is_baseline() -> None:
    """A process seen 1 ms before T-1h and again in the hour is known: no alert."""
    assert alerted({key(): [T - HOUR_MS - 1, T - 10 * MINUTE_MS]}) == set()


def test_keys_only_in_window_alert_and_known_keys_do_not() -> None:
    """New processes alert once each, in key order; processes seen before the hour do not."""
    new_a, new_b, known, stale = key(1, "/a"), key(2, "/b"), key(3, "/c"), key(4, "/d")
    result = run(
        {
            new_b: [T - 5 * MINUTE_MS, T - 4 * MINUTE_MS],
            new_a: [T - 59 * MINUTE_MS],
            known: [T - 2 * DAY_MS, T - 1 * MINUTE_MS],
            stale: [T - 3 * HOUR_MS],  # seen only in the baseline: nothing to report
        }
    )
    assert [f.key for f in result.findings] == [new_a, new_b]
    assert result.excluded == 0
    first = {f.key: f.first_minute for f in result.findings}
    assert first == {
        new_a: (T - 59 * MINUTE_MS) // MINUTE_MS,
        new_b: (T - 5 * MINUTE_MS) // MINUTE_MS,
    }
    for f in result.findings:
        assert f.tick_ms == T and f.rule is PARITY_RULE


def test_finding_carries_exact_first_and_last_seen() -> None:
    """An alert reports the exact first and last observation times of the process."""
    (finding,) = run({key(): [T - 30 * MINUTE_MS + 123, T - 7]}).findings
    assert finding.state.first_seen_ms == T - 30 * MINUTE_MS + 123
    assert finding.state.last_seen_ms == T - 7


@pytest.mark.parametrize(
    "exclusion",
    [
        Exclusion("process.executable.path", "value", "/usr/bin/noisy"),
        Exclusion("process.executable.path", "glob", "/usr/bin/*"),
        Exclusion("process.executable.path", "regex", "^/usr/bin/no"),
        Exclusion("process.executable.name", "regex", "isy$"),
        Exclusion("host", "value", "node-9"),
    ],
    ids=["value", "glob", "regex", "regex-search", "host-alias"],
)
def test_exclusions_drop_and_count(exclusion: Exclusion) -> None:
    """A user's false-positive filter drops matching new processes and counts them."""
    rule = dataclasses.replace(PARITY_RULE, exclude=(exclusion,))
    noisy = key(1, "/usr/bin/noisy", host="node-9")
    other = key(2, "/tmp/dropper")
    known_noisy = key(3, "/usr/bin/noisy", host="node-9")
    result = run(
        {
            noisy: [T - MINUTE_MS],
            other: [T - MINUTE_MS],
            known_noisy: [T - DAY_MS, T - MINUTE_MS],  # not new: not counted as excluded
        },
        rule,
    )
    assert [f.key for f in result.findings] == [other]
    assert result.excluded == 1


def test_value_exclusion_is_exact_and_glob_is_anchored() -> None:
    """Exclusions do not over-match: a value is exact and a glob covers the whole path."""
    rule = dataclasses.replace(
        PARITY_RULE,
        exclude=(
            Exclusion("process.executable.path", "value", "/bin/sh"),
            Exclusion("process.executable.path", "glob", "/opt/*/bin"),
        ),
    )
    keys = {
        key(1, "/bin/sh"): [T - 1],
        key(2, "/bin/shx"): [T - 1],
        key(3, "/opt/a/bin/x"): [T - 1],
    }
    result = run(keys, rule)
    assert [f.key for f in result.findings] == [key(2, "/bin/shx"), key(3, "/opt/a/bin/x")]
    assert result.excluded == 1


@pytest.mark.parametrize("offset", [1, 999, SECOND_MS, 59 * SECOND_MS])
def test_tick_not_on_a_whole_minute_is_refused(offset: int) -> None:
    """Evaluating at a time that is not a whole minute is an error, not a silent shift."""
    with pytest.raises(ValueError, match="whole minute"):
        run({key(): [T - 1]}, at=T + offset)


def test_any_whole_minute_tick_works() -> None:
    """The rule can be evaluated at any whole minute, not only on the hour."""
    at = T + 17 * MINUTE_MS
    assert alerted({key(): [T + 16 * MINUTE_MS]}, at=at) == {key()}
    assert alerted({key(): [at - HOUR_MS - 1, at - 1]}, at=at) == set()


# -- the rule against a brute-force reading of its definition ------------------------------

SMALL = dataclasses.replace(PARITY_RULE, window_minutes=3, baseline_minutes=10)
KEYS = [key(1, "/a"), key(2, "/b"), key(3, "/c"), key(4, "/usr/bin/d")]
SPAN_MIN = 14  # observations fall in [T - 12 min, T + 2 min)


def brute_force(rule: Rule, tick_ms: int, times: dict[KeyTuple, list[int]]) -> list[tuple]:
    w = rule.window_minutes * MINUTE_MS
    b = rule.baseline_minutes * MINUTE_MS
    out = []
    for k, ts in sorted(times.items()):
        current = [t for t in ts if tick_ms - w <= t < tick_ms]
        baseline = [t for t in ts if tick_ms - b <= t < tick_ms - w]
        if current and not baseline and rule.excluded_by(k) is None:
            out.append((k, min(current) // MINUTE_MS))
    return out


offsets_ms = st.lists(
    st.one_of(
        st.integers(0, SPAN_MIN * MINUTE_MS - 1),
        st.integers(0, SPAN_MIN).map(lambda m: m * MINUTE_MS),  # exact minute edges
        st.integers(1, SPAN_MIN).map(lambda m: m * MINUTE_MS - 1),  # last ms of a minute
    ),
    max_size=6,
)


@SETTINGS
@given(
    st.fixed_dictionaries({k: offsets_ms for k in KEYS}),
    st.integers(-2, 2),
    st.booleans(),
)
def test_evaluate_matches_brute_force(
    offsets: dict[KeyTuple, list[int]], tick_shift: int, exclude: bool
) -> None:
    """For any observation times, the alerts are exactly those the rule's definition gives."""
    start = T - 12 * MINUTE_MS
    times = {k: [start + o for o in os] for k, os in offsets.items()}
    rule = SMALL
    if exclude:
        rule = dataclasses.replace(
            SMALL, exclude=(Exclusion("process.executable.path", "glob", "/usr/*"),)
        )
    tick = T + tick_shift * MINUTE_MS
    result = run(times, rule, at=tick)
    got = [(f.key, f.first_minute) for f in result.findings]
    assert got == brute_force(rule, tick, times)
    unfiltered = brute_force(dataclasses.replace(rule, exclude=()), tick, times)
    assert result.excluded == len(unfiltered) - len(got)
