"""FirstSeenStore over a real RocksDB: exact histories, the activity index, expiry, restarts."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pathwatch.clock import DAY_MS, HOUR_MS, MINUTE_MS
from pathwatch.engine.evaluate import Evaluation, evaluate
from pathwatch.observations import KeyTuple, ObservationBatch, Sighting
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.store.codec import KeyState
from pathwatch.store.db import Database, DatabaseOptions
from pathwatch.store.firstseen import FirstSeenStore, Retention
from pathwatch.store.presence import PresenceHistory
from tests.unit.test_evaluate import MemoryReader

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=40)
MORE = settings(SETTINGS, max_examples=100)

RULE = dataclasses.replace(PARITY_RULE, window_minutes=60, baseline_minutes=180)
RETENTION = {
    RULE.id: Retention(
        horizon_minutes=RULE.horizon_minutes,
        window_minutes=RULE.window_minutes,
        baseline_minutes=RULE.baseline_minutes,
        onset_gap_minutes=RULE.baseline_minutes - RULE.window_minutes,
    )
}
OTHER_RULE = "not_configured"  # observations for a rule without retention are not stored

HOUR0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS
NOW = HOUR0 + 37 * MINUTE_MS + 12_345  # observations fall in [NOW - SPAN, NOW]
SPAN = 5 * HOUR_MS

KEYS: list[KeyTuple] = [
    ("node-1", "prod", "node-1", str(pid), path, path.rsplit("/", 1)[-1])
    for pid, path in [
        (1, "/bin/a"),
        (2, "/bin/b"),
        (3, "/tmp/\x00odd"),
        (4, "/usr/bin/\u00e9\U0001f600"),
    ]
]


@contextmanager
def open_store(path: str, cache_keys: int = 100_000) -> Iterator[tuple[Database, FirstSeenStore]]:
    db = Database(path, DatabaseOptions(fsync=False))
    try:
        store = FirstSeenStore(db, cache_keys=cache_keys)
        store.prepare_onsets(RULE.id, RETENTION[RULE.id].onset_gap_minutes, NOW // MINUTE_MS)
        yield db, store
    finally:
        db.close()


def to_batch(events: list[tuple[int, int]], rule: str = RULE.id) -> ObservationBatch:
    batch: ObservationBatch = {}
    for k, t in events:
        batch.setdefault((rule, KEYS[k]), Sighting()).add(t)
    return batch


def model_states(events: list[tuple[int, int]]) -> dict[KeyTuple, KeyState]:
    times: dict[KeyTuple, list[int]] = {}
    for k, t in events:
        times.setdefault(KEYS[k], []).append(t)
    return {
        key: KeyState(min(ts), max(ts), PresenceHistory.of_minutes(t // MINUTE_MS for t in ts))
        for key, ts in times.items()
    }


def findings(ev: Evaluation) -> list[tuple[KeyTuple, int, KeyState]]:
    return [(f.key, f.first_minute, f.state) for f in ev.findings]


events_st = st.lists(
    st.tuples(st.integers(0, len(KEYS) - 1), st.integers(NOW - SPAN, NOW)), max_size=8
)


@MORE
@given(
    st.lists(events_st, min_size=1, max_size=6),
    st.lists(st.integers(0, 5), max_size=4),
    st.sampled_from([0, 100_000]),
)
def test_store_matches_model(
    batches: list[list[tuple[int, int]]], replays: list[int], cache_keys: int
) -> None:
    """Out-of-order, duplicated and replayed exports leave exactly the observed history."""
    applied = batches + [batches[i % len(batches)] for i in replays]
    everything = [e for b in batches for e in b]
    model = model_states(everything)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "db")
        with open_store(path, cache_keys) as (_db, store):
            for events in applied:
                result = store.apply(
                    {**to_batch(events), **to_batch(events, OTHER_RULE)}, RETENTION, NOW
                )
                assert result.keys_written <= len({k for k, _ in events})
            check_state(store, model)
        with open_store(path, cache_keys) as (_db, store):  # a restart keeps everything
            check_state(store, model)
            assert store.count_keys(RULE.id) == len(model)


def check_state(store: FirstSeenStore, model: dict[KeyTuple, KeyState]) -> None:
    for key in KEYS:
        assert store.get(RULE.id, key) == model.get(key), key
        assert store.get(OTHER_RULE, key) is None
    assert dict(store.scan(RULE.id)) == model
    reader = MemoryReader({RULE.id: {}})
    reader.states[RULE.id] = model
    for tick in range(NOW - NOW % MINUTE_MS - SPAN - HOUR_MS, NOW + 2 * HOUR_MS, 13 * MINUTE_MS):
        tick_min = tick // MINUTE_MS
        start_min, end_min = tick_min - RULE.window_minutes, tick_min
        listed = [k for k, _ in store.active(RULE.id, start_min, end_min)]
        assert len(listed) == len(set(listed)), "a key is listed twice"
        lo, hi = start_min // 60 * 60, ((end_min - 1) // 60 + 1) * 60
        expected = {k for k, s in model.items() if s.history.observed(lo, hi)}
        assert set(listed) == expected, (tick, listed)
        assert findings(evaluate(RULE, tick, store)) == findings(evaluate(RULE, tick, reader))
        # The onset index names every key the activity index would report, and fewer keys.
        onsets = store.new_candidates(
            RULE.id, start_min, end_min, RULE.baseline_minutes - RULE.window_minutes
        )
        assert onsets is not None
        named = {k for k, _ in onsets}
        in_window = {k for k, s in model.items() if s.history.observed(start_min, end_min)}
        assert {f.key for f in evaluate(RULE, tick, reader).findings} <= named <= in_window


def test_small_cache_does_not_lose_history(tmp_path: Path) -> None:
    """A store whose cache is smaller than one export keeps every key's history and first seen."""
    t = NOW - NOW % MINUTE_MS
    with open_store(str(tmp_path / "db"), cache_keys=1) as (_db, store):
        store.apply(to_batch([(0, t - HOUR_MS), (1, t - HOUR_MS)]), RETENTION, NOW)
        # key 0 unchanged (a cache miss, then remembered), key 1 gets a new minute.
        store.apply(to_batch([(0, t - HOUR_MS), (1, t)]), RETENTION, NOW)
        state = store.get(RULE.id, KEYS[1])
        assert state is not None
        assert state.first_seen_ms == t - HOUR_MS
        assert state.history == PresenceHistory.of_minutes(
            [(t - HOUR_MS) // MINUTE_MS, t // MINUTE_MS]
        )


@SETTINGS
@given(st.lists(events_st, min_size=1, max_size=6), st.integers(1, 3))
def test_store_with_evicting_cache_matches_model(
    batches: list[list[tuple[int, int]]], cache_keys: int
) -> None:
    """However small the key cache, the stored histories are exactly the observed ones."""
    model = model_states([e for b in batches for e in b])
    with (
        tempfile.TemporaryDirectory() as tmp,
        open_store(str(Path(tmp) / "db"), cache_keys) as (
            _db,
            store,
        ),
    ):
        for events in batches:
            store.apply(to_batch(events), RETENTION, NOW)
        for key in KEYS:
            assert store.get(RULE.id, key) == model.get(key), key


def test_first_seen_is_exact_and_last_seen_follows_new_minutes(tmp_path: Path) -> None:
    """First seen moves to an earlier export even inside a known minute; a later point inside
    an already-recorded minute does not rewrite the record (one write per key per minute), so
    last seen advances with each new minute."""
    k = KEYS[0]
    t = NOW - NOW % MINUTE_MS  # a whole minute
    with open_store(str(tmp_path / "db")) as (_db, store):
        store.apply(to_batch([(0, t + 30_000)]), RETENTION, NOW)
        store.apply(to_batch([(0, t + 10_000)]), RETENTION, NOW)  # same minute, earlier
        store.apply(to_batch([(0, t + 59_999)]), RETENTION, NOW)  # same minute, later
        store.apply(to_batch([(0, t + 20_000)]), RETENTION, NOW)  # changes nothing
        state = store.get(RULE.id, k)
        assert state == KeyState(
            t + 10_000, t + 30_000, PresenceHistory(((t // MINUTE_MS, t // MINUTE_MS + 1),))
        )
        store.apply(to_batch([(0, t + 60_500)]), RETENTION, NOW)  # a new minute
        state = store.get(RULE.id, k)
        assert state is not None and state.last_seen_ms == t + 60_500


def test_observations_beyond_the_horizon_are_not_stored(tmp_path: Path) -> None:
    """Data older than the retention horizon is dropped on arrival."""
    horizon_ms = (NOW // MINUTE_MS - RULE.horizon_minutes) * MINUTE_MS
    with open_store(str(tmp_path / "db")) as (_db, store):
        result = store.apply(to_batch([(0, horizon_ms - 1), (1, horizon_ms)]), RETENTION, NOW)
        assert result.keys_written == 1 and result.keys_created == 1
        assert store.get(RULE.id, KEYS[0]) is None
        assert store.get(RULE.id, KEYS[1]) is not None


# -- expiry ---------------------------------------------------------------------------------

SHORT = Retention(horizon_minutes=2 * 24 * 60)
EXP_NOW = HOUR0 - HOUR0 % DAY_MS + 5 * DAY_MS + 7 * HOUR_MS + 123


@SETTINGS
@given(
    st.lists(
        st.tuples(st.integers(0, len(KEYS) - 1), st.integers(EXP_NOW - 6 * DAY_MS, EXP_NOW)),
        min_size=1,
        max_size=14,
    )
)
def test_expire_deletes_exactly_the_keys_unseen_beyond_the_horizon(
    events: list[tuple[int, int]],
) -> None:
    """Keys not seen for longer than the horizon (to the day) are deleted; all others are kept."""
    retention = {RULE.id: SHORT}
    cutoff_day = (EXP_NOW // MINUTE_MS - SHORT.horizon_minutes) // (24 * 60)
    horizon_ms = (EXP_NOW // MINUTE_MS - SHORT.horizon_minutes) * MINUTE_MS
    with tempfile.TemporaryDirectory() as tmp, open_store(str(Path(tmp) / "db")) as (_db, store):
        for k, t in sorted(events, key=lambda e: e[1]):  # ingestion as time passes
            store.apply(to_batch([(k, t)]), retention, t)
        before = {key: store.get(RULE.id, key) for key in KEYS}
        deleted = store.expire(RULE.id, SHORT, EXP_NOW)
        gone = set()
        for key, state in before.items():
            if state is None:
                continue
            if state.last_seen_ms >= horizon_ms:
                assert store.get(RULE.id, key) == state, "a key seen within the horizon was deleted"
            if state.last_seen_ms // DAY_MS < cutoff_day:
                assert store.get(RULE.id, key) is None, "a key unseen beyond the horizon was kept"
                gone.add(key)
            else:
                assert store.get(RULE.id, key) == state
        assert deleted == len(gone)
        listed = {k for k, _ in store.active(RULE.id, 0, EXP_NOW // MINUTE_MS + 60)}
        assert not listed & gone
        assert store.expire(RULE.id, SHORT, EXP_NOW) == 0  # idempotent


def test_expired_key_seen_again_starts_fresh(tmp_path: Path) -> None:
    """A process forgotten by expiry and seen again is new again, with a new first-seen time."""
    retention = {RULE.id: SHORT}
    old = EXP_NOW - 4 * DAY_MS
    with open_store(str(tmp_path / "db")) as (_db, store):
        store.apply(to_batch([(0, old), (1, old)]), retention, old)
        store.apply(to_batch([(1, EXP_NOW - HOUR_MS)]), retention, EXP_NOW - HOUR_MS)
        assert store.expire(RULE.id, SHORT, EXP_NOW) == 1
        assert store.get(RULE.id, KEYS[0]) is None
        assert store.get(RULE.id, KEYS[1]) is not None
        store.apply(to_batch([(0, EXP_NOW)]), retention, EXP_NOW)
        state = store.get(RULE.id, KEYS[0])
        assert state is not None and state.first_seen_ms == EXP_NOW
        assert state.history == PresenceHistory.of_minutes([EXP_NOW // MINUTE_MS])


def test_onset_index_answers_only_where_it_is_complete(tmp_path: Path) -> None:
    """A store that has keys from before the onset index existed (or with another gap) answers
    from the activity index until the window starts where the onset index is complete."""
    gap = RULE.baseline_minutes - RULE.window_minutes
    now_min = NOW // MINUTE_MS
    db = Database(str(tmp_path / "db"), DatabaseOptions(fsync=False))
    try:
        store = FirstSeenStore(db)
        legacy = {RULE.id: dataclasses.replace(RETENTION[RULE.id], onset_gap_minutes=0)}
        store.apply(to_batch([(0, NOW - 10 * MINUTE_MS)]), legacy, NOW)  # no onset written
        coverage = store.prepare_onsets(RULE.id, gap, now_min + 6)
        assert (coverage.gap_minutes, coverage.from_minute) == (gap, now_min + 6)
        assert store.new_candidates(RULE.id, now_min - 60, now_min, gap) is None
        # ... and evaluation still finds the key, through the activity index.
        tick = (now_min + 1) * MINUTE_MS
        assert [f.key for f in evaluate(RULE, tick, store).findings] == [KEYS[0]]
        # From the complete minute on, the onset index answers.
        assert list(store.new_candidates(RULE.id, now_min + 6, now_min + 66, gap) or ()) == []
        # Asking with a shorter gap than the index keeps cannot be answered.
        assert store.new_candidates(RULE.id, now_min + 6, now_min + 66, gap - 1) is None
        # Preparing again with the same gap keeps the coverage; another gap restarts it.
        assert store.prepare_onsets(RULE.id, gap, now_min + 99) == coverage
        assert store.prepare_onsets(RULE.id, gap - 5, now_min + 99).from_minute == now_min + 99
    finally:
        db.close()


def test_onset_index_of_a_new_store_is_complete_from_the_start(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "db")) as (_db, store):
        coverage = store.onset_coverage(RULE.id)
        assert coverage is not None and coverage.from_minute == 0
        store.apply(to_batch([(1, NOW - 5 * MINUTE_MS)]), RETENTION, NOW)
        now_min = NOW // MINUTE_MS
        named = store.new_candidates(RULE.id, now_min - 60, now_min + 1, 120)
        assert [k for k, _ in named or ()] == [KEYS[1]]
