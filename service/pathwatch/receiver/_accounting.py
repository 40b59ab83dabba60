"""The ingest accounting both receivers share, so gRPC and HTTP add up in the same series."""

from __future__ import annotations

from pathwatch.receiver.decode import DecodeResult
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
