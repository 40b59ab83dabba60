"""PresenceHistory against a brute-force model: a Python set of observed minutes."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pathwatch.store.presence import PresenceHistory, new_onsets

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=300)

LO, HI = 0, 40  # small range: hypothesis finds adjacency and boundary cases quickly
minutes = st.integers(LO, HI)
batches = st.lists(st.lists(minutes, max_size=12), max_size=6)


def build(parts: list[list[int]]) -> PresenceHistory:
    history = PresenceHistory()
    for part in parts:
        history = history.with_minutes(part)
    return history


def as_set(history: PresenceHistory) -> set[int]:
    return {m for s, e in history.runs for m in range(s, e)}


def runs_of(model: set[int]) -> int:
    return sum(1 for m in model if m - 1 not in model)


def assert_canonical(history: PresenceHistory) -> None:
    for s, e in history.runs:
        assert s < e, history.runs
    for (_, e1), (s2, _) in zip(history.runs, history.runs[1:], strict=False):
        assert s2 > e1, f"runs overlap or touch: {history.runs}"


@SETTINGS
@given(batches)
@example([[3, 1, 2, 2], [5], [4]])
@example([[0], [0], [HI, HI - 1]])
def test_with_minutes_records_exactly_the_observed_minutes(parts: list[list[int]]) -> None:
    """Minutes added in any order, with duplicates, are recorded exactly: nothing lost or added."""
    history = build(parts)
    model = {m for part in parts for m in part}
    assert_canonical(history)
    assert as_set(history) == model
    assert history == PresenceHistory.of_minutes(model)  # one canonical form per set
    assert history.first_minute == (min(model) if model else None)
    assert history.last_minute == (max(model) if model else None)
    assert history.contains_all(model)
    assert not history.contains_all([m for m in range(LO, HI + 1) if m not in model][:1] or [-1])


@SETTINGS
@given(batches)
def test_observed_matches_model_for_every_range(parts: list[list[int]]) -> None:
    """'Was the key seen in [a, b)?' is answered exactly for every range, including empty ones."""
    history = build(parts)
    model = {m for part in parts for m in part}
    for a in range(LO - 2, HI + 3):
        for b in range(LO - 2, HI + 3):
            expected = any(a <= m < b for m in model)
            assert history.observed(a, b) == expected, (a, b, history.runs)


@SETTINGS
@given(batches)
def test_first_in_matches_model(parts: list[list[int]]) -> None:
    """The first observed minute in a range is the model's minimum there, or None."""
    history = build(parts)
    model = {m for part in parts for m in part}
    for a in range(LO - 2, HI + 3):
        for b in range(a + 1, HI + 3):
            inside = [m for m in model if a <= m < b]
            assert history.first_in(a, b) == (min(inside) if inside else None), (a, b)


@SETTINGS
@given(batches, st.integers(LO - 2, HI + 2), st.integers(1, 6))
@example([[1, 3, 5, 7, 9]], 0, 2)
@example([[1, 2, 10, 11, 13]], 11, 1)
def test_trimmed_drops_old_minutes_and_bounds_runs(
    parts: list[list[int]], before: int, max_runs: int
) -> None:
    """Trimming forgets minutes before the cut and caps runs, never forgetting a kept minute."""
    history = build(parts)
    model = {m for part in parts for m in part if m >= before}
    trimmed = history.trimmed(before, max_runs)
    got = as_set(trimmed)
    assert_canonical(trimmed)
    assert len(trimmed.runs) <= max_runs
    assert model <= got
    assert all(m >= before for m in got)
    if model:
        # Joining runs only fills gaps: nothing outside the kept span appears.
        assert min(got) == min(model) and max(got) == max(model)
    else:
        assert got == set()
    if runs_of(model) <= max_runs:
        assert got == model


@SETTINGS
@given(batches, st.integers(LO, HI), st.integers(1, 4), batches)
def test_trimmed_history_keeps_accepting_minutes(
    parts: list[list[int]], before: int, max_runs: int, more: list[list[int]]
) -> None:
    """A trimmed history still records new minutes exactly on top of what it kept."""
    trimmed = build(parts).trimmed(before, max_runs)
    kept = as_set(trimmed)
    extended = trimmed
    for part in more:
        extended = extended.with_minutes(part)
    assert_canonical(extended)
    assert as_set(extended) == kept | {m for part in more for m in part}


def test_first_in_empty_range_is_none() -> None:
    """Asking for the first minute in an empty range [a, a) (or a > b) finds nothing."""
    history = PresenceHistory.of_minutes([0, 1, 2, 3])
    assert not history.observed(1, 1)
    assert history.first_in(1, 1) is None
    assert history.first_in(3, 1) is None


def test_empty_history_observes_nothing() -> None:
    """A key never seen is reported as not observed anywhere."""
    empty = PresenceHistory()
    assert not empty.observed(0, 10**9)
    assert empty.first_in(0, 10**9) is None
    assert empty.first_minute is None and empty.last_minute is None
    assert empty.with_minutes([]) == empty
    assert empty.trimmed(0, 4) == empty


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(0, 40), max_size=30), st.lists(st.integers(0, 40), max_size=6))
def test_contains_all_matches_the_set_model(stored: list[int], asked: list[int]) -> None:
    """contains_all is true exactly when every asked minute is in the stored set."""
    history = PresenceHistory.of_minutes(stored)
    assert history.contains_all(asked) == set(asked).issubset(stored)


def onsets_model(model: set[int], min_gap: int, floor: int) -> set[int]:
    """Starts of runs (minute m observed, m - 1 not) whose previous observation is at least
    `min_gap` minutes before the start's run began, or absent."""
    out = set()
    for m in model:
        if m - 1 in model or m < floor:
            continue
        earlier = [x for x in model if x < m]
        if not earlier or m - (max(earlier) + 1) >= min_gap:
            out.add(m)
    return out


@SETTINGS
@given(batches, st.integers(1, 12), st.integers(LO, HI))
@example([[5], [20], [10]], 6, 0)  # the later run's onset stays listed though now stale
@example([[10, 11], [9]], 3, 0)  # a run extended backwards gets a new onset
def test_new_onsets_over_writes_cover_every_onset_of_the_final_history(
    parts: list[list[int]], min_gap: int, floor: int
) -> None:
    """Whatever order minutes arrive in, the onsets returned by the writes include every onset
    of the final history (a superset), and every listed onset was an onset when written."""
    history = PresenceHistory()
    listed: set[int] = set()
    for part in parts:
        new = history.with_minutes(part)
        got = new_onsets(history, new, min_gap, floor)
        assert set(got) <= onsets_model(as_set(new), min_gap, floor)
        listed.update(got)
        history = new
    assert onsets_model(as_set(history), min_gap, floor) <= listed
