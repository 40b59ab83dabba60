"""StreamPublisher: takes stream-mode hits and new-key-limit hits off the write path.

The writer hands them over after its commit and never waits: `offer` only appends to a bounded
queue. The publisher's own thread turns them into alerts (which takes the tick runner's lock, so
it may wait behind a running evaluation; an Export's acknowledgement no longer does). Past the
bound, hits are dropped and counted: the next scheduled tick alerts the same occurrences with
the same ids, so a drop delays an alert, never loses it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import structlog

from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="stream")

Job = Callable[[], None]


class StreamPublisher:
    def __init__(self, metrics: Metrics, capacity: int = 10_000) -> None:
        self._metrics = metrics
        self._capacity = max(1, capacity)
        self._jobs: deque[tuple[Job, int]] = deque()
        self._size = 0
        self._cond = threading.Condition()
        self.dropped = 0

    @property
    def depth(self) -> int:
        return self._size

    def offer(self, job: Job, size: int) -> bool:
        """Queue `job` (standing for `size` hits) for the publisher thread. Never blocks;
        False (and counted) when the queue is full."""
        with self._cond:
            if self._size + size > self._capacity and self._size > 0:
                self.dropped += size
                log.warning(
                    "stream queue full: hits left to the next scheduled tick",
                    hits=size,
                    capacity=self._capacity,
                )
                return False
            self._jobs.append((job, size))
            self._size += size
            self._metrics.stream_queue_depth.set(self._size)
            self._cond.notify()
        return True

    def run(self, stop: threading.Event) -> None:
        """Publish until `stop` is set. A job that fails is logged and counted; the scheduled
        tick is the safety net for its hits. An unexpected error outside a job escapes for the
        Supervisor."""
        while not stop.is_set():
            with self._cond:
                if not self._jobs:
                    self._cond.wait(timeout=0.5)
                if not self._jobs:
                    continue
                job, size = self._jobs.popleft()
                self._size -= size
                self._metrics.stream_queue_depth.set(self._size)
            try:
                job()
            except Exception:
                self._metrics.component_failures.labels(component="stream").inc()
                log.exception("cannot publish stream alerts; the next tick will")

    def drain(self, timeout: float) -> None:
        """Run what is queued on the caller's thread, within `timeout` s (at shutdown)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if not self._jobs:
                    return
                job, size = self._jobs.popleft()
                self._size -= size
            try:
                job()
            except Exception:
                log.exception("cannot publish stream alerts; the next tick will")
