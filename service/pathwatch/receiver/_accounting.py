"""Ingest steps both receivers share: the durable write and the accounting, so gRPC and HTTP
behave alike and add up in the same series."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from pathwatch.receiver.decode import HOST_MISMATCH, DecodeResult
from pathwatch.store.writer import Backpressure, BatchSink
from pathwatch.telemetry.metrics import Metrics

ZERO_TIMESTAMP = "zero_timestamp"


@dataclass(slots=True)
class _Pending:
    last: float | None = None  # monotonic time of the last line; None: none yet
    resources: int = 0
    points: int = 0
    example: str = ""  # an attribute name (or, for host_mismatch, the refused host.name)


class RejectionLog:
    """Logs refused input at most once per reason per `interval` seconds.

    Each line carries the counts since the previous line for that reason and one example (the
    missing or offending attribute; for host_mismatch the refused host.name). Counts that
    arrive inside the interval wait for the next refusal after it. Memory is one small record
    per reason (a fixed set). `monotonic` is injected so that tests need not sleep.
    """

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        interval: float = 60.0,
        logger: Any = None,
    ) -> None:
        self._monotonic = monotonic
        self._interval = interval
        self._log = logger if logger is not None else structlog.get_logger(component="receiver")
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def record(self, result: DecodeResult) -> None:
        if result.points_zero_timestamp:
            self._add(ZERO_TIMESTAMP, 0, result.points_zero_timestamp, "time_unix_nano")
        for reason, u in result.untracked.items():
            example = u.example if reason == HOST_MISMATCH else (u.fields or [""])[0]
            self._add(reason, u.resources, u.points, example)

    def _add(self, reason: str, resources: int, points: int, example: str) -> None:
        now = self._monotonic()
        with self._lock:
            p = self._pending.get(reason)
            if p is None:
                p = self._pending[reason] = _Pending()
            p.resources += resources
            p.points += points
            p.example = p.example or example
            if p.last is not None and now - p.last < self._interval:
                return
            line = {"reason": reason, "points": p.points, "example": p.example}
            if reason != ZERO_TIMESTAMP:
                line["resources"] = p.resources
            p.last, p.resources, p.points, p.example = now, 0, 0, ""
        if reason == ZERO_TIMESTAMP:
            self._log.warning("rejected data points without a timestamp", **line)
        else:
            self._log.warning("rejected data points of resources that yield no key", **line)


_REJECTIONS = RejectionLog()  # shared by both receivers: one line per reason per minute


def count_decoded(
    metrics: Metrics, result: DecodeResult, rejections: RejectionLog | None = None
) -> None:
    """Add `result` to the ingest counters and log refused input (rate-limited)."""
    m = metrics
    m.resources.labels(outcome="tracked").inc(result.resources_tracked)
    m.resources.labels(outcome="untracked").inc(result.resources_untracked)
    m.resources.labels(outcome="ignored").inc(result.resources_ignored)
    m.data_points.labels(outcome="accepted").inc(result.points_accepted)
    m.data_points.labels(outcome="too_old").inc(result.points_too_old)
    m.data_points.labels(outcome="too_far_in_future").inc(result.points_future)
    m.data_points.labels(outcome=ZERO_TIMESTAMP).inc(result.points_zero_timestamp)
    m.data_points.labels(outcome="key_too_long").inc(result.points_key_too_long)
    mismatch = result.untracked.get(HOST_MISMATCH)
    m.data_points.labels(outcome=HOST_MISMATCH).inc(0 if mismatch is None else mismatch.points)
    for reason, u in result.untracked.items():
        m.resources_untracked.labels(reason=reason).inc(u.resources)
    if result.untracked or result.points_zero_timestamp:
        (rejections or _REJECTIONS).record(result)


def write_durably(
    writer: BatchSink, result: DecodeResult, timeout: float, sender: str = ""
) -> tuple[bool, str]:
    """Submit the decoded batch and wait up to `timeout` s for it to be durable.

    `sender` names who sent it (client address, or certificate identity under mTLS): new-key
    budgets are charged to it.

    Returns (overloaded, problem): problem is "" on success; overloaded is True when the write
    queue refused the batch (both cases are retryable for the sender).
    """
    try:
        ticket = writer.submit(
            result.batch, result.marks, sender=sender, extension=result.extension
        )
    except Backpressure as exc:
        return True, f"pathwatch is overloaded: {exc}"
    if not ticket.wait(max(0.0, timeout)):
        return False, "pathwatch store unavailable: durable write did not finish in time"
    if isinstance(ticket.error, Backpressure):  # refused by a writer in another process
        return True, f"pathwatch is overloaded: {ticket.error}"
    if ticket.error is not None:
        return False, f"pathwatch store unavailable: {ticket.error}"
    return False, ""
