"""Database: the one class that calls RocksDB (through rocksdict). Everything else uses it."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import structlog
from rocksdict import (
    AccessType,
    BlockBasedIndexType,
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from pathwatch.store.keyspace import prefix_end

log = structlog.get_logger(component="store")

_RECOVERY_INTERVAL_S = 2.0
_BLOCK_BYTES = 16 << 10  # data blocks: 16 KiB compress better than 4 KiB (28% less, measured)
# RocksDB's info log (LOG) is rotated on every open and when it passes the size below; only
# this many old files (LOG.old.*) are kept, so restarts and months of running cost at most
# LOG_KEEP_FILES x LOG_MAX_BYTES of disk.
LOG_KEEP_FILES = 5
LOG_MAX_BYTES = 8 << 20


class StoreError(RuntimeError):
    """RocksDB failed. Writes that raise it are retryable: nothing of the batch was applied."""


class DataDirInUse(StoreError):
    """Another process (a running pathwatch) holds the data directory's lock."""


@dataclass(frozen=True, slots=True)
class DatabaseOptions:
    """Tuning that matters for pathwatch's access pattern (small records, point reads, scans)."""

    fsync: bool = True
    block_cache_bytes: int = 32 << 20
    write_buffer_bytes: int = 16 << 20
    read_only: bool = False


class Batch:
    """Puts and deletes applied atomically by `Database.commit`."""

    __slots__ = ("_wb", "count")

    def __init__(self) -> None:
        self._wb = WriteBatch(raw_mode=True)
        self.count = 0

    def put(self, key: bytes, value: bytes) -> None:
        self._wb.put(key, value)
        self.count += 1

    def delete(self, key: bytes) -> None:
        self._wb.delete(key)
        self.count += 1


class Database:
    """An open RocksDB at `path`. Thread-safe; `close` is idempotent.

    Raises DataDirInUse when another process has the directory open, StoreError on other
    open failures.
    """

    def __init__(self, path: str, options: DatabaseOptions | None = None) -> None:
        self.options = options or DatabaseOptions()
        self.path = path
        os.makedirs(path, exist_ok=True)
        self._db = self._open()
        # rocksdict holds the GIL through a synced write. Syncing with flush_wal instead (which
        # releases it) measured no faster in the bench (+3%, within noise), so writes stay
        # simply synced.
        self._write_opts = WriteOptions()
        self._write_opts.sync = self.options.fsync
        self._closed = False
        self._close_lock = threading.Lock()
        self._recover_lock = threading.Lock()
        self._failing = False
        self._last_recovery = 0.0

    def _open(self) -> Rdict:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_compression_type(DBCompressionType.lz4())
        # Memory stays bounded whatever the number of keys: memtables are capped, and index
        # and filter blocks live inside the block cache instead of growing beside it.
        opts.set_write_buffer_size(self.options.write_buffer_bytes)
        opts.set_max_write_buffer_number(2)
        opts.set_max_background_jobs(2)
        opts.set_max_open_files(512)
        opts.set_keep_log_file_num(LOG_KEEP_FILES)
        opts.set_max_log_file_size(LOG_MAX_BYTES)
        table = BlockBasedOptions()
        table.set_block_cache(Cache(self.options.block_cache_bytes))
        table.set_block_size(_BLOCK_BYTES)
        table.set_cache_index_and_filter_blocks(True)
        # Partitioned index and filters: a file's index is cut into 4 KiB partitions under a
        # small pinned top level. A whole-file index block (megabytes for a 64 MiB file of
        # pathwatch's long keys) is larger than one shard of the block cache, so it was read
        # and parsed again on every point read: ~0.7 ms per read instead of a few us.
        table.set_index_type(BlockBasedIndexType.two_level_index_search())
        table.set_partition_filters(True)
        table.set_metadata_block_size(4096)
        table.set_pin_top_level_index_and_filter(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        table.set_bloom_filter(10, False)
        opts.set_block_based_table_factory(table)
        access = AccessType.read_only() if self.options.read_only else AccessType.read_write()
        try:
            # pathwatch keeps everything in the default column family (a data dir with others
            # would not open: only the families named here are opened).
            # The options go to the default column family explicitly: without that, rocksdict
            # reopens an existing database with the column family options stored in its
            # OPTIONS file, and a changed block cache size or table format would not apply.
            return Rdict(self.path, opts, column_families={"default": opts}, access_type=access)
        except Exception as exc:
            text = str(exc)
            if "lock" in text.lower():
                raise DataDirInUse(
                    f"data directory {self.path} is in use by another process "
                    "(a running pathwatch?)"
                ) from exc
            raise StoreError(f"cannot open RocksDB at {self.path}: {text}") from exc

    def _recover(self) -> None:
        """Reopen after a failed write. RocksDB refuses every write after an I/O error such as
        a full disk until the database is reopened; doing it here (at most every 2 s) is what
        lets pathwatch heal by itself once space is freed, without a crash loop."""
        with self._recover_lock:
            if not self._failing or time.monotonic() - self._last_recovery < _RECOVERY_INTERVAL_S:
                return
            self._last_recovery = time.monotonic()
            old = self._db
            # It failed already; closing may fail too, but it releases the file lock.
            with contextlib.suppress(Exception):
                old.close()
            self._db = self._open()
            self._failing = False
            log.warning("rocksdb reopened after write errors", path=self.path)

    def get(self, key: bytes) -> bytes | None:
        try:
            value = self._db.get(key)
        except Exception as exc:
            raise StoreError(f"RocksDB read failed: {exc}") from exc
        return None if value is None else bytes(value)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            values: list[bytes | None] = self._db.get(keys)  # type: ignore[arg-type,assignment]  # stub: str-only list
        except Exception as exc:
            raise StoreError(f"RocksDB read failed: {exc}") from exc
        return values

    def commit(self, batch: Batch) -> None:
        """Apply `batch` atomically; it is in the WAL (and fsynced when configured) on return.

        Raises StoreError (retryable) when RocksDB refuses it. Then nothing of the batch is
        visible, but when it was the WAL sync that failed, the batch's WAL record may be
        replayed when the database is reopened (after write errors, `_recover`): callers must
        not keep in memory a state that assumes either outcome (sequence numbers, counts).
        """
        if batch.count == 0:
            return
        if self._failing:
            self._recover()
        try:
            self._db.write(batch._wb, self._write_opts)
        except Exception as exc:
            self._failing = True
            raise StoreError(f"RocksDB write failed: {exc}") from exc

    def scan(
        self, lower: bytes, upper: bytes, *, values: bool = True, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        """Entries with lower <= key < upper, in key order (or reverse)."""
        ro = ReadOptions()
        ro.set_iterate_lower_bound(lower)
        ro.set_iterate_upper_bound(upper)
        if not reverse:
            # rocksdict's item iterators take one call per entry instead of four (valid, key,
            # value, next): scans of 100,000 entries (a tick's late keyspace after a backfill)
            # run ~2.5x faster. The bounds are checked here too, as below.
            # (raw mode: keys and values are bytes, whatever the stubs say)
            if values:
                items = cast("Iterator[tuple[bytes, bytes]]",
                             self._db.items(from_key=lower, read_opt=ro))  # fmt: skip
                for key, value in items:
                    if key < lower or key >= upper:
                        return
                    yield key, value
            else:
                keys = cast("Iterator[bytes]", self._db.keys(from_key=lower, read_opt=ro))
                for key in keys:
                    if key < lower or key >= upper:
                        return
                    yield key, b""
            return
        it = self._db.iter(ro)
        it.seek_to_last()
        # The bounds are also checked here: rocksdict ignores the lower bound when iterating
        # in reverse (seen with 0.3.29).
        while it.valid():
            key = bytes(it.key())
            if key < lower or key >= upper:
                return
            yield key, (bytes(it.value()) if values else b"")
            it.prev()

    def scan_prefix(self, prefix: bytes, *, values: bool = True) -> Iterator[tuple[bytes, bytes]]:
        return self.scan(prefix, prefix_end(prefix), values=values)

    def delete_range(self, lower: bytes, upper: bytes) -> None:
        if self._failing:
            self._recover()
        try:
            self._db.delete_range(lower, upper, self._write_opts)
        except Exception as exc:
            self._failing = True
            raise StoreError(f"RocksDB delete_range failed: {exc}") from exc

    def property_int(self, name: str) -> int:
        """A RocksDB integer property, 0 when RocksDB cannot answer (closed after write errors,
        shutting down): /metrics must keep working exactly then."""
        try:
            value = self._db.property_int_value(name)
        except Exception:
            return 0
        return int(value) if value is not None else 0

    def compact(self) -> None:
        self._db.compact_range(None, None)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.close()
            except Exception as exc:
                raise StoreError(f"RocksDB close failed: {exc}") from exc
