"""Database: RocksDB options that pathwatch relies on take effect, also on an existing dir."""

from __future__ import annotations

import re
from pathlib import Path

from rocksdict import Options, Rdict

from pathwatch.store.db import Batch, Database, DatabaseOptions


def _latest_options(path: Path) -> str:
    newest = max(path.glob("OPTIONS-*"), key=lambda p: int(p.name.split("-")[1]))
    return newest.read_text()


def _setting(text: str, name: str) -> str:
    found = re.search(rf"^\s*{name}=(.*)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in OPTIONS"
    return found.group(1)


def test_table_options_apply_to_a_data_dir_written_with_other_options(tmp_path: Path) -> None:
    # A data dir written by a release with the default table format (whole-file index).
    old = Rdict(str(tmp_path), Options(raw_mode=True))
    old[b"Rk"] = b"v"
    old.close()
    assert _setting(_latest_options(tmp_path), "index_type") == "kBinarySearch"

    db = Database(str(tmp_path), DatabaseOptions(fsync=False, write_buffer_bytes=8 << 20))
    try:
        assert db.get(b"Rk") == b"v"
    finally:
        db.close()
    text = _latest_options(tmp_path)
    assert _setting(text, "index_type") == "kTwoLevelIndexSearch"
    assert _setting(text, "partition_filters") == "true"
    assert _setting(text, "block_size") == "16384"
    assert _setting(text, "write_buffer_size") == str(8 << 20)


def test_files_written_have_a_partitioned_index(tmp_path: Path) -> None:
    db = Database(str(tmp_path), DatabaseOptions(fsync=False))
    try:
        for chunk in range(4):
            batch = Batch()
            for i in range(5_000):
                batch.put(b"R" + f"host-{chunk}-{i:06d}".encode() * 4, b"x" * 20)
            db.commit(batch)
        db.compact()
        props = db._db.property_value("rocksdb.aggregated-table-properties") or ""
        partitions = re.search(r"# index partitions=(\d+)", props)
        assert partitions is not None and int(partitions.group(1)) > 1, props
        assert db.get(b"R" + b"host-3-004999" * 4) == b"x" * 20
    finally:
        db.close()


def test_properties_read_zero_once_rocksdb_is_closed(tmp_path: Path) -> None:
    """Gauges read RocksDB properties on every scrape; a closed handle (shutdown, or a reopen
    that failed after write errors) must not break /metrics."""
    db = Database(str(tmp_path), DatabaseOptions(fsync=False))
    assert db.property_int("rocksdb.estimate-num-keys") == 0
    db.close()
    assert db.property_int("rocksdb.block-cache-usage") == 0


def test_info_logs_stay_bounded_across_restarts(tmp_path: Path) -> None:
    """Reopening the database many times keeps at most LOG_KEEP_FILES info logs (LOG plus
    LOG.old.*): restarts over months do not fill the disk with RocksDB's own logs."""
    from pathwatch.store.db import LOG_KEEP_FILES

    for _ in range(10):
        Database(str(tmp_path), DatabaseOptions(fsync=False)).close()
    logs = [p.name for p in tmp_path.iterdir() if p.name.startswith("LOG")]
    assert "LOG" in logs
    assert 0 < len(logs) <= LOG_KEEP_FILES
    assert len([n for n in logs if n.startswith("LOG.old")]) == LOG_KEEP_FILES - 1
