"""A commit whose WAL sync fails may still apply (RocksDB replays the WAL record when the
database is reopened after write errors). What the stores keep in memory must not assume
either outcome. A real fsync error cannot be produced here, so the database below applies
the batch for real and then reports the failure, as RocksDB would."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathwatch.observations import Sighting
from pathwatch.store.alertlog import AlertStore
from pathwatch.store.db import Batch, Database, DatabaseOptions, StoreError
from pathwatch.store.firstseen import FirstSeenStore
from tests.unit.test_firstseen import KEYS, NOW, RETENTION, RULE


class SyncFailsOnce(Database):
    """Applies the next commit, then raises as a failed WAL sync does."""

    fail_next = False

    def commit(self, batch: Batch) -> None:
        super().commit(batch)
        if self.fail_next:
            self.fail_next = False
            raise StoreError("RocksDB write failed: IO error: fsync (simulated)")


def _sighting(ms: int) -> Sighting:
    s = Sighting()
    s.add(ms)
    return s


def test_key_counts_follow_the_store_after_a_commit_that_failed_but_applied(
    tmp_path: Path,
) -> None:
    db = SyncFailsOnce(str(tmp_path), DatabaseOptions(fsync=False))
    try:
        store = FirstSeenStore(db)
        db.fail_next = True
        with pytest.raises(StoreError):
            store.apply({(RULE.id, KEYS[0]): _sighting(NOW - 60_000)}, RETENTION, NOW)
        store.apply({(RULE.id, KEYS[1]): _sighting(NOW - 60_000)}, RETENTION, NOW)
        stored = sum(1 for _ in store.scan(RULE.id))
        assert stored == 2
        assert store.key_count(RULE.id) == stored
    finally:
        db.close()


def test_outbox_sequence_numbers_are_not_reused_after_a_commit_that_failed_but_applied(
    tmp_path: Path,
) -> None:
    db = SyncFailsOnce(str(tmp_path), DatabaseOptions(fsync=False))
    try:
        alerts = AlertStore(db)
        db.fail_next = True
        with pytest.raises(StoreError):
            alerts.commit_tick(None, [("a1", NOW, {"id": "a1"})], [("hook", "a1", {"id": "a1"})])
        alerts.commit_tick(None, [("a2", NOW, {"id": "a2"})], [("hook", "a2", {"id": "a2"})])
        ids = [d.record["alert_id"] for d in alerts.pending("hook")]
        assert ids == ["a1", "a2"]  # the second did not overwrite the first
    finally:
        db.close()


class CommitFailsOnce(Database):
    """Refuses the next commit without applying it (a write error before the WAL)."""

    fail_next = False

    def commit(self, batch: Batch) -> None:
        if self.fail_next:
            self.fail_next = False
            raise StoreError("RocksDB write failed: IO error: No space left (simulated)")
        super().commit(batch)


def test_context_entries_of_a_refused_commit_are_written_by_the_retry(tmp_path: Path) -> None:
    """A commit that wrote nothing must not leave the context index believing its entries
    exist: the retry of the same observation writes them ("seen on N nodes" stays exact)."""
    db = CommitFailsOnce(str(tmp_path), DatabaseOptions(fsync=False))
    try:
        store = FirstSeenStore(db)
        store.set_context_fields(RULE.id, RULE.key_fields)
        db.fail_next = True
        batch = {(RULE.id, KEYS[0]): _sighting(NOW - 60_000)}
        with pytest.raises(StoreError):
            store.apply(batch, RETENTION, NOW)
        store.apply(batch, RETENTION, NOW)
        assert any(True for _ in db.scan_prefix(b"P"))
    finally:
        db.close()
