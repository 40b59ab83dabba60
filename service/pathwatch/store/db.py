"""Database: the one class that calls RocksDB (through rocksdict). Everything else uses it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from rocksdict import (
    AccessType,
    DBCompressionType,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from pathwatch.store.keyspace import prefix_end


class StoreError(RuntimeError):
    """RocksDB failed. Writes that raise it are retryable: nothing of the batch was applied."""


class DataDirInUse(StoreError):
    """Another process (a running pathwatch) holds the data directory's lock."""


@dataclass(frozen=True, slots=True)
class DatabaseOptions:
    """Tuning that matters for pathwatch's access pattern (small records, point reads, scans)."""

    fsync: bool = True
    block_cache_bytes: int = 64 << 20
    write_buffer_bytes: int = 32 << 20
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
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_compression_type(DBCompressionType.lz4())
        opts.set_write_buffer_size(self.options.write_buffer_bytes)
        opts.set_max_background_jobs(2)
        try:
            access = AccessType.read_only() if self.options.read_only else AccessType.read_write()
            self._db = Rdict(path, opts, access_type=access)
        except Exception as exc:
            text = str(exc)
            if "lock" in text.lower():
                raise DataDirInUse(
                    f"data directory {path} is in use by another process (a running pathwatch?)"
                ) from exc
            raise StoreError(f"cannot open RocksDB at {path}: {text}") from exc
        self._write_opts = WriteOptions()
        self._write_opts.sync = self.options.fsync
        self._closed = False
        self._close_lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        value = self._db.get(key)
        return None if value is None else bytes(value)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        values: list[bytes | None] = self._db.get(keys)  # type: ignore[arg-type,assignment]  # stub: str-only list
        return values

    def commit(self, batch: Batch) -> None:
        """Apply `batch` atomically; it is in the WAL (and fsynced when configured) on return."""
        if batch.count == 0:
            return
        try:
            self._db.write(batch._wb, self._write_opts)
        except Exception as exc:
            raise StoreError(f"RocksDB write failed: {exc}") from exc

    def scan(
        self, lower: bytes, upper: bytes, *, values: bool = True, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        """Entries with lower <= key < upper, in key order (or reverse)."""
        ro = ReadOptions()
        ro.set_iterate_lower_bound(lower)
        ro.set_iterate_upper_bound(upper)
        it = self._db.iter(ro)
        if reverse:
            it.seek_to_last()
        else:
            it.seek(lower)
        # The bounds are also checked here: rocksdict ignores the lower bound when iterating
        # in reverse (seen with 0.3.29).
        while it.valid():
            key = bytes(it.key())
            if key < lower or key >= upper:
                return
            yield key, (bytes(it.value()) if values else b"")
            if reverse:
                it.prev()
            else:
                it.next()

    def scan_prefix(self, prefix: bytes, *, values: bool = True) -> Iterator[tuple[bytes, bytes]]:
        return self.scan(prefix, prefix_end(prefix), values=values)

    def delete_range(self, lower: bytes, upper: bytes) -> None:
        try:
            self._db.delete_range(lower, upper, self._write_opts)
        except Exception as exc:
            raise StoreError(f"RocksDB delete_range failed: {exc}") from exc

    def property_int(self, name: str) -> int:
        value = self._db.property_int_value(name)
        return int(value) if value is not None else 0

    def compact(self) -> None:
        self._db.compact_range(None, None)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
