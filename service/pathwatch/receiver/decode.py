"""Decoder: OTLP ExportMetricsServiceRequest bytes -> observations per rule and key.

Pure (no I/O) and thread-safe. One resource is one process; it is an observation of its key (the
rule's key fields, read from resource attributes) at every distinct timestamp of a data point of a
metric matching the rule's globs. Time is event time (``time_unix_nano``), not arrival time.

Speed comes from the reduced views in proto/ (see _view.py): the request is parsed into one
object per resource holding the raw Resource bytes, the list of metric names and the list of data
point timestamps, all in C. The Resource bytes repeat from one scrape to the next, so the key
fields decoded from them are cached. Only a resource that mixes metrics a rule counts with metrics
it does not is decoded metric by metric.

Before that, when the decoder is given the store's DurableResources, a request is first parsed
through the flat view (the whole request merged into one resource, still in C): if every point
falls in one minute and every resource is already durable for that minute, the request changes
nothing and is answered from a handful of C-level calls, without a per-resource Python loop.
That is five scrapes in six of a running process. The full path reports which resources it
saw in exactly one minute (`DecodeResult.marks`), for the writer to add once durable.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from pathwatch.observations import Mark, ObservationBatch, RuleKey, Sighting
from pathwatch.receiver._view import (
    FlatRequest,
    MergedRequest,
    MergedResourceMetrics,
    MetricRequest,
    MetricResourceMetrics,
    RawRequest,
    ResourceView,
)
from pathwatch.rules.model import Rule
from pathwatch.store.durable import DurableResources, covers

MINUTE_NS = 60_000_000_000
_MAX_NEW_SHARE = 4  # past 1 / this of a request's resources new, the full path is cheaper

_KINDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")
_NONE, _ALL, _MIXED = 0, 1, 2
_TOO_LONG = object()  # cache marker: a key field exceeds the size cap
_BAD = object()  # cache marker: the Resource bytes do not decode


class InvalidRequest(ValueError):
    """The request bytes are not an ExportMetricsServiceRequest. Permanent (INVALID_ARGUMENT)."""


@dataclass(slots=True)
class DecodeResult:
    batch: ObservationBatch = field(default_factory=dict)
    marks: list[Mark] = field(default_factory=list)
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


def rejection_message(result: DecodeResult, bounds: TimeBounds) -> str:
    parts = []
    if result.points_too_old:
        oldest = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bounds.oldest_ms / 1000))
        parts.append(f"{result.points_too_old} older than the retention horizon ({oldest})")
    if result.points_future:
        parts.append(f"{result.points_future} timestamped too far in the future")
    if result.points_key_too_long:
        parts.append(f"{result.points_key_too_long} from resources with an oversized key attribute")
    return f"pathwatch rejected {result.points_rejected} data points: " + "; ".join(parts)


class _BoundedCache:
    """A dict that forgets its oldest half when full: bounded memory, no per-hit bookkeeping."""

    def __init__(self, capacity: int) -> None:
        self._data: dict[Any, Any] = {}
        self._capacity = max(0, capacity)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

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

    `resource_cache` bounds how many distinct resources' key fields are remembered. With
    `durable`, requests that bring nothing new take the fast path (module docstring).
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        max_key_field_bytes: int = 4096,
        resource_cache: int = 100_000,
        durable: DurableResources | None = None,
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
        self._durable = durable
        self._counted_by_all: set[str] = set()  # metric names every rule counts

    @property
    def cached_resources(self) -> int:
        return len(self._resources)

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

    def decode(
        self, data: bytes, bounds: TimeBounds, host_filter: Callable[[str], bool] | None = None
    ) -> DecodeResult:
        """Decode `data`. Raises InvalidRequest when it is not a valid request message.

        With `host_filter`, a resource whose host.name it refuses is not stored (its points are
        rejected: identity binding under mTLS)."""
        if self._durable is not None and self._rules:
            known = self._decode_known(data, bounds)
            if known is not None:
                return known
        return self._decode_full(data, bounds)

    def _counted_everywhere(self, names: set[str]) -> bool:
        if names <= self._counted_by_all:
            return True
        for name in names - self._counted_by_all:
            if not all(self._name_groups(name)):
                return False
            if len(self._counted_by_all) < 10_000:
                self._counted_by_all.add(name)
        return True

    def _decode_known(self, data: bytes, bounds: TimeBounds) -> DecodeResult | None:
        """The result for a request that brings nothing new, or None (take the full path).

        Nothing new: every metric is counted by every rule, every point lies in one minute and
        inside the accepted range, and every Resource is durable for that minute from the
        request's earliest point on. A ResourceMetrics without points or without a Resource
        makes no observation either way, so the merged lists decide exactly.
        """
        assert self._durable is not None
        try:
            flat = FlatRequest.FromString(data).resource_metrics
        except (DecodeError, RecursionError, ValueError):
            return None  # the full path reports it
        raws = flat.resource
        metrics = flat.scope_metrics.metrics
        if not raws or not self._counted_everywhere(set(metrics.name)):
            return None
        if (
            metrics.histogram.data_points.time_unix_nano
            or metrics.exponential_histogram.data_points.time_unix_nano
            or metrics.summary.data_points.time_unix_nano
        ):
            return None  # rare in process metrics: not worth a fast path
        gauge = metrics.gauge.data_points.time_unix_nano
        total = metrics.sum.data_points.time_unix_nano
        points = len(gauge) + len(total)
        if not points:
            return None
        stamps = set(gauge)  # one pass in C; a scrape's points share a few timestamps
        stamps.update(total)
        lo, hi = min(stamps), max(stamps)
        minute = lo // MINUTE_NS
        if (
            hi // MINUTE_NS != minute
            or lo < bounds.oldest_ms * 1_000_000
            or hi > bounds.newest_ms * 1_000_000 + 999_999
        ):
            return None
        earliest_ms = lo // 1_000_000
        values = list(map(self._durable.get, map(hash, raws)))
        result = DecodeResult()
        new: list[int] = []
        tracked = 0
        for i, value in enumerate(values):
            if value is None or not covers(value, minute, earliest_ms):
                new.append(i)
                if len(new) > len(values) // _MAX_NEW_SHARE:
                    return None  # mostly new (a new minute): the full path is cheaper
            else:
                tracked += value & 1
        taken = self._take_new(data, raws, new, bounds, result) if new else 0
        if taken is None:
            return None
        result.points_accepted += points - taken
        result.resources_tracked += tracked
        result.resources_untracked += len(values) - len(new) - tracked
        return result

    def _take_new(
        self, data: bytes, raws: Any, new: list[int], bounds: TimeBounds, result: DecodeResult
    ) -> int | None:
        """Decode only the ResourceMetrics at positions `new` of the flat resource list into
        `result`; returns their points, or None when positions cannot be trusted to name
        ResourceMetrics (then the caller takes the full path, with a fresh result).

        Trusted when the request has as many ResourceMetrics as Resources, no Resource twice,
        and the ResourceMetrics at each new position holds that Resource: then every
        ResourceMetrics whose Resource is new sits at one of these positions.
        """
        try:
            rms = RawRequest.FromString(data).resource_metrics
        except (DecodeError, RecursionError, ValueError):
            return None
        if len(rms) != len(raws) or len(set(raws)) != len(raws):
            return None
        window = (bounds.oldest_ms * 1_000_000, bounds.newest_ms * 1_000_000 + 999_999)
        taken = 0
        for i in new:
            raw_rm = rms[i]
            try:
                rm = MergedResourceMetrics.FromString(raw_rm)
            except (DecodeError, RecursionError, ValueError):
                return None
            if rm.resource != raws[i]:
                return None
            view = functools.partial(MetricResourceMetrics.FromString, raw_rm)
            taken += self._take(rm, view, window, result)
        return taken

    def _decode_full(self, data: bytes, bounds: TimeBounds) -> DecodeResult:
        try:
            request = MergedRequest.FromString(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            raise InvalidRequest(f"cannot decode ExportMetricsServiceRequest: {exc}") from exc
        result = DecodeResult()
        per_metric: Any = None

        def metric_view(index: int) -> Any:
            nonlocal per_metric
            if per_metric is None:
                per_metric = MetricRequest.FromString(data)
            return per_metric.resource_metrics[index]

        window = (bounds.oldest_ms * 1_000_000, bounds.newest_ms * 1_000_000 + 999_999)
        for index, rm in enumerate(request.resource_metrics):
            self._take(rm, functools.partial(metric_view, index), window, result)
        return result

    def _take(
        self,
        rm: Any,
        metric_view: Callable[[], Any],
        window: tuple[int, int],
        result: DecodeResult,
    ) -> int:
        """Decode one ResourceMetrics (a MergedResourceMetrics) into `result`; returns its
        counted points. `metric_view` gives it metric by metric, for a mixed resource."""
        merged = rm.scope_metrics.metrics
        status = self._match(tuple(merged.name))
        if _MIXED in status:
            stamps, counted = self._times_by_metric(metric_view())
            npoints = len(counted)
        elif _ALL in status:
            lists = [v.data_points.time_unix_nano for f, v in merged.ListFields() if f.number != 1]
            npoints = sum(map(len, lists))
            counted = lists[0] if len(lists) == 1 else [t for lst in lists for t in lst]
            stamps = [counted if s == _ALL else [] for s in status]
        else:
            result.resources_ignored += 1
            return 0
        if not npoints:
            result.resources_ignored += 1
            return 0
        raw = rm.resource
        keys = self._keys(raw)
        if keys is _TOO_LONG:
            result.points_key_too_long += npoints
            result.resources_untracked += 1
            return npoints
        if keys is _BAD:
            result.resources_untracked += 1
            return npoints
        oldest_ns, newest_ns = window
        distinct = set(counted)
        lo, hi = min(distinct), max(distinct)
        single_minute = lo // MINUTE_NS == hi // MINUTE_NS
        total = npoints
        if lo < oldest_ns or hi > newest_ns:
            single_minute = False
            old = sum(1 for t in counted if t < oldest_ns)
            future = sum(1 for t in counted if t > newest_ns)
            result.points_too_old += old
            result.points_future += future
            npoints -= old + future
            stamps = [[t for t in lst if oldest_ns <= t <= newest_ns] for lst in stamps]
            distinct = {t for t in distinct if oldest_ns <= t <= newest_ns}
        result.points_accepted += npoints
        batch = result.batch
        stored: list[RuleKey] = []
        for key, g, rule_id in zip(keys, self._rule_group, self._rule_ids, strict=True):
            if key is None or not stamps[g]:
                continue
            stored.append((rule_id, key))
            sighting = batch.get((rule_id, key))
            if sighting is None:
                sighting = batch[(rule_id, key)] = Sighting()
            for t in distinct if stamps[g] is counted else set(stamps[g]):
                sighting.add(t // 1_000_000)
        if stored:
            result.resources_tracked += 1
        else:
            result.resources_untracked += 1
        # Only a resource that every rule counts in full is marked: the fast path holds only
        # requests whose every metric every rule counts.
        if single_minute and self._durable is not None and all(x == _ALL for x in status):
            mark = Mark(hash(raw), lo // MINUTE_NS, lo // 1_000_000, tuple(stored))
            result.marks.append(mark)
        return total

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
