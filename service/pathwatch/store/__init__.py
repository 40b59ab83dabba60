"""Store: first-seen state, ticks, alerts and the outbox in one RocksDB; the only RocksDB code."""

from pathwatch.store.alertlog import AlertStore, Delivery, TickRecord
from pathwatch.store.codec import KeyState, RecordFormatError
from pathwatch.store.db import Database, DatabaseOptions, DataDirInUse, StoreError
from pathwatch.store.firstseen import FirstSeenStore, Retention
from pathwatch.store.presence import PresenceHistory
from pathwatch.store.sweep import KeyspaceSweeper, SweepPolicy
from pathwatch.store.writer import Backpressure, IngestWriter, Ticket, WriteFailed, WriterConfig

__all__ = [
    "AlertStore",
    "Backpressure",
    "DataDirInUse",
    "Database",
    "DatabaseOptions",
    "Delivery",
    "FirstSeenStore",
    "IngestWriter",
    "KeyState",
    "KeyspaceSweeper",
    "PresenceHistory",
    "RecordFormatError",
    "Retention",
    "StoreError",
    "SweepPolicy",
    "TickRecord",
    "Ticket",
    "WriteFailed",
    "WriterConfig",
]
