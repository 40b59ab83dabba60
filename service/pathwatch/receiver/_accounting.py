"""Ingest steps both receivers share: the durable write and the accounting, so gRPC and HTTP
behave alike and add up in the same series."""

from __future__ import annotations

from pathwatch.receiver.decode import DecodeResult
from pathwatch.store.writer import Backpressure, IngestWriter
from pathwatch.telemetry.metrics import Metrics


def count_decoded(metrics: Metrics, result: DecodeResult) -> None:
    m = metrics
    m.resources.labels(outcome="tracked").inc(result.resources_tracked)
    m.resources.labels(outcome="untracked").inc(result.resources_untracked)
    m.resources.labels(outcome="ignored").inc(result.resources_ignored)
    m.data_points.labels(outcome="accepted").inc(result.points_accepted)
    m.data_points.labels(outcome="too_old").inc(result.points_too_old)
    m.data_points.labels(outcome="too_far_in_future").inc(result.points_future)
    m.data_points.labels(outcome="key_too_long").inc(result.points_key_too_long)


def write_durably(
    writer: IngestWriter, result: DecodeResult, timeout: float, sender: str = ""
) -> tuple[bool, str]:
    """Submit the decoded batch and wait up to `timeout` s for it to be durable.

    `sender` names who sent it (client address, or certificate identity under mTLS): new-key
    budgets are charged to it.

    Returns (overloaded, problem): problem is "" on success; overloaded is True when the write
    queue refused the batch (both cases are retryable for the sender).
    """
    try:
        ticket = writer.submit(result.batch, result.marks, sender=sender)
    except Backpressure as exc:
        return True, f"pathwatch is overloaded: {exc}"
    if not ticket.wait(max(0.0, timeout)) or ticket.error is not None:
        reason = ticket.error or "durable write did not finish in time"
        return False, f"pathwatch store unavailable: {reason}"
    return False, ""
