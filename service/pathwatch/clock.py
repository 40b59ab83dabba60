"""Injected time: every component reads the time through a Clock, never ad hoc."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time source. `now_ms` is Unix time in milliseconds (UTC)."""

    def now_ms(self) -> int: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to: a 30-day window is tested in milliseconds.

    Thread-safe; `advance` also moves the monotonic reading.
    """

    def __init__(self, now_ms: int = 1_700_000_000_000) -> None:
        self._lock = threading.Lock()
        self._now_ms = now_ms
        self._mono = 0.0

    def now_ms(self) -> int:
        with self._lock:
            return self._now_ms

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def set_ms(self, now_ms: int) -> None:
        with self._lock:
            self._mono += max(0, now_ms - self._now_ms) / 1000
            self._now_ms = now_ms

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now_ms += int(seconds * 1000)
            self._mono += seconds


MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def minute_of(ms: int) -> int:
    """The minute (since the Unix epoch) that contains the instant `ms`."""
    return ms // MINUTE_MS
