"""due_ticks: which hourly ticks are due, after downtime too, and how many are skipped."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pathwatch.clock import HOUR_MS
from pathwatch.scheduler.scheduler import due_ticks, next_tick

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=300)

HOURLY = "0 * * * *"
H0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS  # a whole hour


def hourly_between(after_ms: int, due_before_ms: int) -> list[int]:
    """Brute force: every whole hour T with after_ms < T <= due_before_ms."""
    first = (after_ms // HOUR_MS + 1) * HOUR_MS
    return list(range(first, due_before_ms + 1, HOUR_MS))


def test_due_before_exactly_on_a_tick_includes_it() -> None:
    """The tick at exactly the due time runs now, not an hour later."""
    assert due_ticks(HOURLY, H0 - 1, H0, 24) == ([H0], 0)
    assert due_ticks(HOURLY, H0 - HOUR_MS, H0, 24) == ([H0], 0)


def test_after_is_exclusive() -> None:
    """The tick already run (the cursor) is not run again."""
    assert due_ticks(HOURLY, H0, H0 + HOUR_MS - 1, 24) == ([], 0)
    assert due_ticks(HOURLY, H0, H0 + HOUR_MS, 24) == ([H0 + HOUR_MS], 0)


def test_tick_just_after_due_time_is_not_due() -> None:
    """A tick 1 ms in the future is not run yet."""
    assert due_ticks(HOURLY, H0 - 2 * HOUR_MS, H0 - 1, 24) == ([H0 - HOUR_MS], 0)


def test_nothing_when_due_before_is_not_after_cursor() -> None:
    """If the due time is not past the cursor there is nothing to run."""
    assert due_ticks(HOURLY, H0, H0, 24) == ([], 0)
    assert due_ticks(HOURLY, H0 + 5, H0, 24) == ([], 0)
    assert due_ticks(HOURLY, H0 + 10 * HOUR_MS, H0, 24) == ([], 0)


def test_catch_up_limit_keeps_newest_and_counts_skipped() -> None:
    """After downtime, only the newest ticks up to the limit run; the older ones are counted."""
    ticks, skipped = due_ticks(HOURLY, H0 - 10 * HOUR_MS, H0 + 30 * 60_000, 3)
    assert ticks == [H0 - 2 * HOUR_MS, H0 - HOUR_MS, H0]
    assert skipped == 7


@SETTINGS
@given(
    after=st.integers(H0 - 30 * HOUR_MS, H0 + 2 * HOUR_MS),
    length=st.integers(-HOUR_MS, 40 * HOUR_MS),
    limit=st.integers(1, 30),
    snap=st.sampled_from(["none", "after", "before", "both"]),
)
@example(after=H0 - 1, length=1, limit=1, snap="none")
@example(after=H0 - HOUR_MS, length=HOUR_MS + 500, limit=1, snap="none")
def test_due_ticks_matches_brute_force(after: int, length: int, limit: int, snap: str) -> None:
    """Due ticks are the newest `limit` hours in (after, due_before]; the rest are skipped."""
    if snap in ("after", "both"):
        after -= after % HOUR_MS
    due_before = after + length
    if snap in ("before", "both"):
        due_before -= due_before % HOUR_MS
    expected = hourly_between(after, due_before)
    ticks, skipped = due_ticks(HOURLY, after, due_before, limit)
    assert ticks == expected[-limit:]
    assert skipped == max(0, len(expected) - limit)


def test_next_tick_is_strictly_after() -> None:
    """The next tick after a tick is one hour later; after any other time, the next whole hour."""
    assert next_tick(HOURLY, H0) == H0 + HOUR_MS
    assert next_tick(HOURLY, H0 - 1) == H0
    assert next_tick(HOURLY, H0 + 1) == H0 + HOUR_MS
