"""Decoder: OTLP ExportMetricsServiceRequest bytes -> observations per rule and key.

Pure (no I/O) and thread-safe. One resource is one process; it is an observation of its key (the
rule's key fields, read from resource attributes) at every distinct timestamp of a data point of a
metric matching the rule's globs. Time is event time (``time_unix_nano``), not arrival time.

Speed comes from the reduced views in proto/ (see _view.py): the request is parsed into one
object per resource holding the raw Resource bytes, the list of metric names and the list of data
point timestamps, all in C. The Resource bytes repeat from one scrape to the next, so the key
fields decoded from them are cached. Only a resource that mixes metrics a rule counts with metrics
it does not is decoded metric by metric.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from pathwatch.observations import ObservationBatch, Sighting
from pathwatch.receiver._view import MergedRequest, MetricRequest, ResourceView
from pathwatch.rules.model import Rule

_KINDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")
_NONE, _ALL, _MIXED = 0, 1, 2
_TOO_LONG = object()  # cache marker: a key field exceeds the size cap
_BAD = object()  # cache marker: the Resource bytes do not decode


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


class _BoundedCache:
    """A dict that forgets its oldest half when full: bounded memory, no per-hit bookkeeping."""

    def __init__(self, capacity: int) -> None:
        self._data: dict[Any, Any] = {}
        self._capacity = max(0, capacity)
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        return self._data.get(key)

    def put(self, key: Any, value: Any) -> None:
        if self._capacity == 0:
            return
        with self._lock:
            if len(self._data) >= self._capacity:
                for old in list(self._data)[: self._capacity // 2 + 1]:
                    del self._data[old]
            self._data[key] = value


class Decoder:
    """Decodes requests for a fixed set of rules. Build a new one when rules change.

    `resource_cache` bounds how many distinct resources' key fields are remembered.
    """

    def __init__(
        self, rules: Sequence[Rule], max_key_field_bytes: int = 4096, resource_cache: int = 100_000
    ) -> None:
        self._rules = [r for r in rules if r.enabled]
        self._groups: list[tuple[str, ...]] = sorted({r.metrics for r in self._rules})
        self._rule_group = [self._groups.index(r.metrics) for r in self._rules]
        self._rule_ids = [r.id for r in self._rules]
        self._needed = frozenset(f for r in self._rules for f in r.key_fields)
        self._max_field = max_key_field_bytes
        self._names = _BoundedCache(10_000)
        self._single: dict[str, tuple[bool, ...]] = {}
        self._resources = _BoundedCache(resource_cache)

    # -- metric name matching ---------------------------------------------------------------

    def _name_groups(self, name: str) -> tuple[bool, ...]:
        hit = self._single.get(name)
        if hit is None:
            hit = tuple(any(fnmatchcase(name, g) for g in globs) for globs in self._groups)
            if len(self._single) < 10_000:  # metric names are few; bound it regardless
                self._single[name] = hit
        return hit

    def _match(self, names: tuple[str, ...]) -> tuple[int, ...]:
        """Per glob group: _NONE, _ALL or _MIXED of the resource's metric names."""
        status: tuple[int, ...] | None = self._names.get(names)
        if status is None:
            per_name = [self._name_groups(n) for n in names]
            status = tuple(
                _ALL if all(p[g] for p in per_name)
                else _NONE if not any(p[g] for p in per_name)
                else _MIXED
                for g in range(len(self._groups))
            )  # fmt: skip
            self._names.put(names, status)
        return status

    # -- resources ------------------------------------------------------------------------

    def _keys(self, raw: bytes) -> Any:
        """Per rule, the key tuple of a Resource (None where a key field is missing or empty);
        or the _TOO_LONG / _BAD marker. Cached by the Resource bytes."""
        cache_key = (hash(raw), len(raw))
        cached = self._resources.get(cache_key)
        if cached is not None:
            return cached
        result = self._decode_keys(raw)
        self._resources.put(cache_key, result)
        return result

    def _decode_keys(self, raw: bytes) -> Any:
        try:
            attributes = ResourceView.FromString(raw).attributes
        except (DecodeError, RecursionError, ValueError):
            return _BAD
        values: dict[str, str] = {}
        for name in self._needed:
            if name not in attributes:
                continue
            v = attributes[name]
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
            if len(text.encode("utf-8", "surrogatepass")) > self._max_field:
                return _TOO_LONG
            if text:
                values[name] = text
        keys: list[tuple[str, ...] | None] = []
        for rule in self._rules:
            key = tuple(values.get(f, "") for f in rule.key_fields)
            keys.append(None if "" in key else key)
        return tuple(keys)

    # -- decoding -------------------------------------------------------------------------

    def decode_message(
        self, request: ExportMetricsServiceRequest, bounds: TimeBounds
    ) -> DecodeResult:
        return self.decode(request.SerializeToString(), bounds)

    def decode(self, data: bytes, bounds: TimeBounds) -> DecodeResult:
        """Decode `data`. Raises InvalidRequest when it is not a valid request message."""
        try:
            request = MergedRequest.FromString(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            raise InvalidRequest(f"cannot decode ExportMetricsServiceRequest: {exc}") from exc
        result = DecodeResult()
        batch = result.batch
        oldest_ns = bounds.oldest_ms * 1_000_000
        newest_ns = bounds.newest_ms * 1_000_000 + 999_999
        per_metric: Any = None
        for index, rm in enumerate(request.resource_metrics):
            merged = rm.scope_metrics.metrics
            status = self._match(tuple(merged.name))
            if _MIXED in status:
                if per_metric is None:
                    per_metric = MetricRequest.FromString(data)
                stamps, counted = self._times_by_metric(per_metric.resource_metrics[index])
                npoints = len(counted)
            elif _ALL in status:
                lists = [
                    v.data_points.time_unix_nano for f, v in merged.ListFields() if f.number != 1
                ]
                npoints = sum(map(len, lists))
                counted = lists[0] if len(lists) == 1 else [t for lst in lists for t in lst]
                stamps = [counted if s == _ALL else [] for s in status]
            else:
                result.resources_ignored += 1
                continue
            if not npoints:
                result.resources_ignored += 1
                continue
            keys = self._keys(rm.resource)
            if keys is _TOO_LONG:
                result.points_key_too_long += npoints
                result.resources_untracked += 1
                continue
            if keys is _BAD:
                result.resources_untracked += 1
                continue
            distinct = set(counted)
            if min(distinct) < oldest_ns or max(distinct) > newest_ns:
                old = sum(1 for t in counted if t < oldest_ns)
                future = sum(1 for t in counted if t > newest_ns)
                result.points_too_old += old
                result.points_future += future
                npoints -= old + future
                stamps = [[t for t in lst if oldest_ns <= t <= newest_ns] for lst in stamps]
                distinct = {t for t in distinct if oldest_ns <= t <= newest_ns}
            result.points_accepted += npoints
            keyed = False
            for key, g, rule_id in zip(keys, self._rule_group, self._rule_ids, strict=True):
                if key is None or not stamps[g]:
                    continue
                keyed = True
                sighting = batch.get((rule_id, key))
                if sighting is None:
                    sighting = batch[(rule_id, key)] = Sighting()
                for t in distinct if stamps[g] is counted else set(stamps[g]):
                    sighting.add(t // 1_000_000)
            if keyed:
                result.resources_tracked += 1
            else:
                result.resources_untracked += 1
        return result

    def _times_by_metric(self, rm: Any) -> tuple[list[list[int]], list[int]]:
        """Timestamps per glob group, and of every counted point (a point of a metric that at
        least one group matches), metric by metric: the fallback for mixed resources."""
        out: list[list[int]] = [[] for _ in self._groups]
        counted: list[int] = []
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                hits = self._name_groups(metric.name)
                if not any(hits):
                    continue
                points = [t for k in _KINDS for t in getattr(metric, k).data_points.time_unix_nano]
                counted.extend(points)
                for g, hit in enumerate(hits):
                    if hit:
                        out[g].extend(points)
        return out, counted
