"""Decoder: OTLP ExportMetricsServiceRequest bytes -> observations per rule and key.

Pure and thread-safe (no I/O). One resource is one process; it is an observation of its key (the
rule's key fields, read from resource attributes) at every distinct timestamp of a data point of a
metric matching the rule's globs. Time is event time (``time_unix_nano``), not arrival time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from pathwatch.observations import ObservationBatch, Sighting
from pathwatch.rules.model import Rule

_DATA_KINDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")


class InvalidRequest(ValueError):
    """The request bytes are not an ExportMetricsServiceRequest. Permanent (INVALID_ARGUMENT)."""


@dataclass(slots=True)
class DecodeResult:
    batch: ObservationBatch = field(default_factory=dict)
    points_accepted: int = 0
    points_too_old: int = 0
    points_future: int = 0
    points_key_too_long: int = 0
    resources_tracked: int = 0
    resources_untracked: int = 0
    resources_ignored: int = 0

    @property
    def points_rejected(self) -> int:
        return self.points_too_old + self.points_future + self.points_key_too_long


@dataclass(frozen=True)
class TimeBounds:
    """Accepted event times, Unix ms, inclusive: older or newer points are rejected."""

    oldest_ms: int
    newest_ms: int


class Decoder:
    """Decodes requests for a fixed set of rules. Build a new one when rules change."""

    def __init__(self, rules: Sequence[Rule], max_key_field_bytes: int = 4096) -> None:
        self._rules = [r for r in rules if r.enabled]
        self._groups: list[tuple[str, ...]] = sorted({r.metrics for r in self._rules})
        self._rule_group = [self._groups.index(r.metrics) for r in self._rules]
        self._needed = frozenset(f for r in self._rules for f in r.key_fields)
        self._max_field = max_key_field_bytes
        self._metric_groups: dict[str, tuple[int, ...]] = {}

    def _groups_of(self, name: str) -> tuple[int, ...]:
        groups = self._metric_groups.get(name)
        if groups is None:
            groups = tuple(
                i
                for i, globs in enumerate(self._groups)
                if any(_glob_match(name, g) for g in globs)
            )
            if len(self._metric_groups) < 10_000:  # metric names are few; bound it regardless
                self._metric_groups[name] = groups
        return groups

    def decode(self, data: bytes, bounds: TimeBounds) -> DecodeResult:
        """Decode `data`. Raises InvalidRequest when it is not a valid request message."""
        request = ExportMetricsServiceRequest()
        try:
            request.ParseFromString(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            raise InvalidRequest(f"cannot decode ExportMetricsServiceRequest: {exc}") from exc
        return self.decode_message(request, bounds)

    def decode_message(
        self, request: ExportMetricsServiceRequest, bounds: TimeBounds
    ) -> DecodeResult:
        result = DecodeResult()
        batch = result.batch
        ngroups = len(self._groups)
        oldest_ns = bounds.oldest_ms * 1_000_000
        newest_ns = bounds.newest_ms * 1_000_000 + 999_999
        for rm in request.resource_metrics:
            times: list[set[int]] = [set() for _ in range(ngroups)]
            tracked_points = old = future = 0
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    groups = self._groups_of(metric.name)
                    if not groups:
                        continue
                    kind = metric.WhichOneof("data")
                    if kind is None:
                        continue
                    for dp in getattr(metric, kind).data_points:
                        t = dp.time_unix_nano
                        tracked_points += 1
                        if t < oldest_ns:
                            old += 1
                        elif t > newest_ns:
                            future += 1
                        else:
                            for g in groups:
                                times[g].add(t)
            if tracked_points == 0:
                result.resources_ignored += 1
                continue
            values, too_long = self._key_values(rm.resource.attributes)
            if too_long:
                result.points_key_too_long += tracked_points
                result.resources_untracked += 1
                continue
            result.points_too_old += old
            result.points_future += future
            result.points_accepted += tracked_points - old - future
            keyed = False
            for rule, g in zip(self._rules, self._rule_group, strict=True):
                if not times[g]:
                    continue
                key = tuple(values.get(f, "") for f in rule.key_fields)
                if "" in key:
                    continue
                keyed = True
                sighting = batch.get((rule.id, key))
                if sighting is None:
                    sighting = batch[(rule.id, key)] = Sighting()
                for t in times[g]:
                    sighting.add(t // 1_000_000)
            if keyed:
                result.resources_tracked += 1
            else:
                result.resources_untracked += 1
        return result

    def _key_values(self, attributes: object) -> tuple[dict[str, str], bool]:
        """Key-field attribute values normalised to strings; True when one exceeds the cap."""
        values: dict[str, str] = {}
        needed = self._needed
        for kv in attributes:  # type: ignore[attr-defined]
            if kv.key not in needed:
                continue
            v = kv.value
            which = v.WhichOneof("value")
            if which == "string_value":
                text = v.string_value
            elif which == "int_value":
                text = str(v.int_value)
            elif which == "bool_value":
                text = "true" if v.bool_value else "false"
            elif which == "double_value":
                text = repr(v.double_value)
            else:
                continue
            if (
                len(text) > self._max_field
                or len(text.encode("utf-8", "surrogatepass")) > self._max_field
            ):
                return values, True
            values[kv.key] = text
        return values, False


def _glob_match(name: str, glob: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(name, glob)
