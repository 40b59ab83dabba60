"""The fold's short path (FirstSeenStore._fold_extensions) writes byte for byte what the
general fold (`apply(folding=True)` for every key) writes.

Two real RocksDB stores take the same writes: stored minutes (some late, so untrusted; some
with gaps), then logged minutes at minute boundaries that cross hour and day boundaries, for
several keys, some of them with minutes logged after the fold cycle started. One folds with
`fold` (the short path where it applies), the other with the general path only; every key and
value of the two databases must then be the same (records, activity, onset and expiry index
entries, log entries), and the short path must actually have been taken.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pathwatch.clock import MINUTE_MS
from pathwatch.observations import Extension, Sighting
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.store import firstseen
from pathwatch.store.codec import decode_state
from pathwatch.store.db import Database, DatabaseOptions
from pathwatch.store.extend import LOG_PREFIX, item_of, log_key, rule_key_of
from pathwatch.store.firstseen import FirstSeenStore, Retention

DAY = 1440
M0 = 20_139 * DAY - 4  # four minutes before a day (and hour) boundary
RULE = PARITY_RULE.id
KEYS = [(RULE, ("prod", "node-1", f"/bin/p{i}", f"p{i}", "root")[: len(PARITY_RULE.key_fields)])
        for i in range(4)]  # fmt: skip


def retention(lateness_minutes: int) -> dict[str, Retention]:
    return {
        RULE: Retention(
            horizon_minutes=PARITY_RULE.horizon_minutes,
            lateness_ms=lateness_minutes * MINUTE_MS,
            onset_gap_minutes=PARITY_RULE.baseline_minutes - PARITY_RULE.window_minutes,
        )
    }


def general_fold(store: FirstSeenStore, ret: dict[str, Retention], now_ms: int) -> None:
    """The fold as it was before the short path: every key through apply(folding=True)."""
    pending = store.pending
    while pending.unfolded:
        if not pending.folding:
            if not pending.fresh:
                store._db.delete_range(log_key(0), log_key(pending.seq + 1))
                pending.cleared = pending.seq
                break
            pending.start_cycle()
        chunk = pending.take(2)
        if chunk:
            batch = {rule_key_of(item): Sighting() for item in chunk}
            store.apply(batch, ret, now_ms, folding=True)
            pending.settle(True)
        done = pending.cycle_done()
        if done is not None:
            store._db.delete_range(log_key(0), log_key(done + 1))


def dump(db: Database) -> dict[bytes, bytes]:
    return dict(db.scan_prefix(b""))


# Per key: stored minutes (offsets from M0, negative: before it), then the minutes logged.
stored_minutes = st.lists(st.integers(-30, 0), min_size=1, max_size=4)
key_plan = st.tuples(stored_minutes, st.integers(0, 6), st.booleans())


@settings(derandomize=True, database=None, deadline=None, max_examples=120)
@given(
    st.lists(key_plan, min_size=1, max_size=4),
    st.integers(0, 20),
    st.integers(0, 5),
    st.integers(0, 5),
)
@example([([0], 5, False)], 0, 0, 0)
@example([([-3, -1, 0], 6, True), ([-20, 0], 2, False)], 10, 3, 0)
@example([([-2, 0], 3, True)], 0, 0, 4)  # a stored run ends in an hour's first minute
def test_the_short_fold_writes_what_the_general_fold_writes(
    plans: list[tuple[list[int], int, bool]], lateness: int, fresh_after: int, shift: int
) -> None:
    """`shift` moves every minute later: stored runs then end before, at or after the
    hour and day boundary four minutes after M0."""
    m0 = M0 + shift
    ret = retention(lateness)
    last_logged = m0 + max(n for _, n, _ in plans)
    now_ms = (last_logged + 1) * MINUTE_MS
    with tempfile.TemporaryDirectory() as tmp:
        stores = []
        for name in ("short", "general"):
            db = Database(str(Path(tmp) / name), DatabaseOptions(fsync=False))
            stores.append(FirstSeenStore(db, cache_keys=2 if name == "short" else 100))
        try:
            for store in stores:
                for (minutes, _, early), rule_key in zip(plans, KEYS, strict=False):
                    sighting = Sighting()
                    for m in minutes:
                        sighting.add((m0 + m) * MINUTE_MS + 7_000)
                    # Written `early`: on time; else at `now`: older minutes are untrusted.
                    at = (m0 + 1) * MINUTE_MS if early else now_ms
                    store.apply({rule_key: sighting}, ret, at)
                # Minutes logged after m0, one per key per minute; some after the cycle began.
                for k in range(1, last_logged - m0 + 1):
                    t = (m0 + k) * MINUTE_MS + 7_000
                    resources = tuple(
                        (i, (item_of(rk),))
                        for i, ((_, n, _), rk) in enumerate(zip(plans, KEYS, strict=False))
                        if k <= n
                    )
                    if k == fresh_after + 1 and store.pending.fresh:
                        store.pending.start_cycle()  # a cycle under way when more arrive
                    store.apply({}, ret, t + 1_000, extensions=[Extension(t, resources)])
            short, general = stores
            short.fold_all(ret, now_ms)
            general_fold(general, ret, now_ms)
            assert not short.pending and not general.pending
            assert dump(short._db) == dump(general._db)
            assert not any(k.startswith(LOG_PREFIX) for k in dump(short._db))
            if any(n and early and len(set(minutes)) == 1 and minutes[0] == 0
                   for minutes, n, early in plans):  # fmt: skip
                assert short.keys_folded_short > 0, "a plain extension must take the short path"
            assert general.keys_folded_short == 0
            # The key cache never holds a state its record does not (the short fold refreshes
            # cached keys and leaves the others out), so later writes start from the truth.
            for (rule, key), (rkey, state) in short._cache.items():
                assert decode_state(short._db.get(rkey)) == state, (rule, key)
        finally:
            for store in stores:
                store._db.close()


def test_the_short_path_declines_what_it_does_not_cover() -> None:
    """No record, untrusted minutes, a gap, an overlap, several runs of pending minutes."""
    from pathwatch.store.codec import KeyState
    from pathwatch.store.extend import Pending
    from pathwatch.store.presence import PresenceHistory

    state = KeyState(M0 * MINUTE_MS, M0 * MINUTE_MS, PresenceHistory(((M0 - 5, M0 + 1),)))
    after = Pending(M0 + 1, (M0 + 1) * MINUTE_MS)
    assert firstseen._extended(state, [after], M0 - 100, 256) is not None
    assert firstseen._extended(None, [after], M0 - 100, 256) is None
    untrusted = KeyState(state.first_seen_ms, state.last_seen_ms, state.history,
                         PresenceHistory(((M0, M0 + 1),)))  # fmt: skip
    assert firstseen._extended(untrusted, [after], M0 - 100, 256) is None
    gap = Pending(M0 + 3, (M0 + 3) * MINUTE_MS)
    assert firstseen._extended(state, [gap], M0 - 100, 256) is None
    overlap = Pending(M0, M0 * MINUTE_MS)
    assert firstseen._extended(state, [overlap], M0 - 100, 256) is None
    assert firstseen._extended(state, [after], M0 - 2, 256) is None  # a run to trim
    split = Pending(M0 + 1, (M0 + 1) * MINUTE_MS)
    split.add(M0 + 4, (M0 + 4) * MINUTE_MS)
    assert firstseen._extended(state, [split], M0 - 100, 256) is None
