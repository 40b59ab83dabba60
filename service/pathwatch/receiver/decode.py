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
That is five scrapes in six of a running process at a 10 s interval. At a minute boundary
(every scrape at the collector's 60 s interval), a resource durable for the minute before
the request's, whose points all carry the request's one timestamp, is an *extension*: its
keys come from the DurableResources entry, undecoded, and the store logs the new minute
(store/extend.py). The full path reports which resources it saw in exactly one minute
(`DecodeResult.marks`), for the writer to add once durable.

Where it was built, the optional C accelerator (_wirescan.c) reads a request for the fast path
in one pass over its wire bytes instead of the two views, and runs the per-resource loop; it
answers exactly what the views answer and leaves any request not shaped like a collector's to
them (ACCELERATED; PATHWATCH_PURE_PYTHON=1 switches it off).

No input makes a process invisible without a reason the sender can read: metric names are read
as bytes and a Resource that is not UTF-8 somewhere is read again through an all-bytes view, so
invalid UTF-8 parses, and key fields that are not UTF-8 are kept with the offending bytes
escaped as ``\\xNN`` (``backslashreplace``). A resource that yields no key is refused with a
reason (UNTRACKED_REASONS), its points count as rejected, and so do points whose timestamp is
0; `rejection_message` says why, for partial_success.
"""

from __future__ import annotations

import functools
import operator
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Final, NamedTuple

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from pathwatch.clock import DAY_MS, MINUTE_MS
from pathwatch.observations import Extension, KeyTuple, Mark, ObservationBatch, RuleKey, Sighting
from pathwatch.receiver._view import (
    FlatRequest,
    MergedRequest,
    MergedResourceMetrics,
    MetricRequest,
    MetricResourceMetrics,
    RawRequest,
    ResourceListView,
    ResourceView,
)
from pathwatch.rules.model import Rule
from pathwatch.store.durable import DurableResources, covers

MINUTE_NS = 60_000_000_000
_SPAN = struct.Struct("=II")  # a ResourceMetrics' start and end in the request (_wirescan.c)
_MAX_NEW_SHARE = 4  # past 1 / this of a request's resources new, the full path is cheaper

_NUMBER_KINDS = ("gauge", "sum")  # NumberDataPoints: counted by their value (otlpview.proto)
_OTHER_KINDS = ("histogram", "exponential_histogram", "summary")
_NONE, _ALL, _MIXED = 0, 1, 2
_EXAMPLE_CHARS = 256  # a refused host.name kept as an example is cut to this

# Why a resource with counted metrics yields no key (pathwatch_resources_untracked_total).
MISSING_FIELD: Final = "missing_field"  # a key field absent or empty
UNSUPPORTED_TYPE: Final = "unsupported_type"  # a key field that is an array, kvlist or bytes
TOO_LONG: Final = "too_long"  # a key field over max_key_field_bytes
INVALID: Final = "invalid"  # the Resource bytes do not decode
HOST_MISMATCH: Final = "host_mismatch"  # host.name refused by the host filter (mTLS identity)
NOT_OWNED: Final = "not_owned"  # k8s.cluster.name of a cluster this shard does not own
UNTRACKED_REASONS: Final = (
    MISSING_FIELD,
    UNSUPPORTED_TYPE,
    TOO_LONG,
    INVALID,
    HOST_MISMATCH,
    NOT_OWNED,
)
HOST_FIELD: Final = "host.name"
CLUSTER_FIELD: Final = "k8s.cluster.name"


PURE_PYTHON_ENV: Final = "PATHWATCH_PURE_PYTHON"


def _accelerator() -> Any:
    """The C module of the fast path (_wirescan.c: `scan` and `classify`), unless it was not
    built (no compiler where pathwatch was installed) or PATHWATCH_PURE_PYTHON is set: both
    paths decide the same."""
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return None
    try:
        from pathwatch.receiver import _wirescan
    except ImportError:
        return None
    return _wirescan


_wire = _accelerator()
ACCELERATED: Final = _wire is not None  # reported as pathwatch_build_info{fast_path}


class InvalidRequest(ValueError):
    """The request bytes are not an ExportMetricsServiceRequest. Permanent (INVALID_ARGUMENT)."""


@dataclass(slots=True)
class Untracked:
    """Resources of one request refused for one reason: how many, their data points (all
    rejected), the attributes that caused it (distinct, in first-seen order: bounded by the
    rules' key fields) and, for host_mismatch, the first refused host.name."""

    resources: int = 0
    points: int = 0
    fields: list[str] = field(default_factory=list)
    example: str = ""


@dataclass(slots=True)
class DecodeResult:
    batch: ObservationBatch = field(default_factory=dict)
    marks: list[Mark] = field(default_factory=list)
    # Resources whose new minute directly follows one durable for them (store/extend.py).
    extension: Extension | None = None
    points_accepted: int = 0
    points_too_old: int = 0
    points_future: int = 0
    points_zero_timestamp: int = 0  # time_unix_nano 0: absent, so no event time
    resources_tracked: int = 0
    resources_ignored: int = 0
    untracked: dict[str, Untracked] = field(default_factory=dict)  # by UNTRACKED_REASONS

    @property
    def resources_untracked(self) -> int:
        return sum(u.resources for u in self.untracked.values())

    @property
    def points_untracked(self) -> int:
        return sum(u.points for u in self.untracked.values())

    @property
    def points_key_too_long(self) -> int:
        u = self.untracked.get(TOO_LONG)
        return 0 if u is None else u.points

    @property
    def points_rejected(self) -> int:
        """Every point not accepted: the count partial_success reports."""
        return (
            self.points_too_old
            + self.points_future
            + self.points_zero_timestamp
            + self.points_untracked
        )

    def refuse(self, reason: str, attribute: str, points: int, example: str = "") -> None:
        """Count one resource refused for `reason` (an UNTRACKED_REASONS entry) with its
        `points`, `attribute` naming the field that caused it ("" for none)."""
        u = self.untracked.get(reason)
        if u is None:
            u = self.untracked[reason] = Untracked(example=example[:_EXAMPLE_CHARS])
        u.resources += 1
        u.points += points
        if attribute and attribute not in u.fields:
            u.fields.append(attribute)


@dataclass(frozen=True)
class TimeBounds:
    """Accepted event times, Unix ms, inclusive: older or newer points are rejected."""

    oldest_ms: int
    newest_ms: int


def accepted_times(rules: Sequence[Rule], max_future_skew_s: float, now_ms: int) -> TimeBounds:
    """The event times a service with `rules` accepts at `now_ms`: back to the longest
    baseline plus window plus a day, forward to the allowed clock skew."""
    horizon = max(
        ((r.baseline_minutes + r.window_minutes) * MINUTE_MS for r in rules if r.enabled),
        default=0,
    )
    return TimeBounds(
        oldest_ms=now_ms - horizon - DAY_MS, newest_ms=now_ms + int(max_future_skew_s * 1000)
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _untracked_part(reason: str, u: Untracked) -> str:
    n, resources = u.points, _plural(u.resources, "resource")
    names = " or ".join(u.fields)
    if reason == MISSING_FIELD:
        return f"{n} data points from {resources} without key field {names}"
    if reason == UNSUPPORTED_TYPE:
        return (
            f"{n} data points from {resources} whose key field {names} is not a string, int, "
            "bool or double"
        )
    if reason == TOO_LONG:
        return f"{n} data points from {resources} with an oversized key attribute ({names})"
    if reason == HOST_MISMATCH:
        return f"{n} data points from resources whose host.name is not in the client certificate"
    if reason == NOT_OWNED:
        cluster = f"cluster {u.example!r}" if u.example else "no k8s.cluster.name"
        return (
            f"{n} data points from {resources} of {cluster}, which this pathwatch shard does "
            "not own (shard.clusters)"
        )
    return f"{n} data points from {resources} whose Resource does not decode"


def rejection_message(result: DecodeResult, bounds: TimeBounds) -> str:
    """The partial_success error_message for `result`: why each rejected point was rejected."""
    parts = []
    if result.points_too_old:
        oldest = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bounds.oldest_ms / 1000))
        parts.append(f"{result.points_too_old} older than the retention horizon ({oldest})")
    if result.points_future:
        parts.append(f"{result.points_future} timestamped too far in the future")
    if result.points_zero_timestamp:
        parts.append(f"{result.points_zero_timestamp} without a timestamp (time_unix_nano 0)")
    for reason in UNTRACKED_REASONS:
        u = result.untracked.get(reason)
        if u is not None and u.points:
            parts.append(_untracked_part(reason, u))
    return f"pathwatch rejected {result.points_rejected} data points: " + "; ".join(parts)


class _Resource(NamedTuple):
    """What the decoder needs from one Resource, cached by its bytes (a tuple: built once per
    distinct Resource, on the cold path, so cheap to make).

    `keys` per rule, None where a key field is missing, empty or of an unsupported type, with
    `why` saying which (reason, field); `host` is host.name ("" when absent or oversized);
    `refused` is set when the whole resource is refused (invalid, too_long), whatever a rule
    needs; `complete` when every rule has its key.
    """

    keys: tuple[KeyTuple | None, ...]
    why: tuple[tuple[str, str] | None, ...]
    host: str = ""
    refused: tuple[str, str] | tuple[str, str, str] | None = None  # (reason, field[, example])
    complete: bool = False


def _key_getter(fields: tuple[str, ...]) -> Callable[[Mapping[str, str]], KeyTuple]:
    """A C-level getter of the tuple of `fields` from a dict; raises KeyError when one is
    missing. (itemgetter of one item returns the item, not a 1-tuple.)"""
    if len(fields) == 1:
        (only,) = fields
        return lambda values: (values[only],)
    return operator.itemgetter(*fields)


_new_resource = tuple.__new__  # builds a _Resource without NamedTuple's Python-level __new__


def _listed_attributes(raw: bytes) -> Mapping[str, Any] | None:
    """A Resource's attributes by name (escaped), values as AnyValueBytesView: the view for a
    Resource that holds bytes that are not UTF-8. None when it does not parse at all."""
    try:
        listed = ResourceListView.FromString(raw).attributes
    except (DecodeError, RecursionError, ValueError):
        return None
    return {kv.key.decode("utf-8", "backslashreplace"): kv.value for kv in listed}  # last wins


def _text(value: Any) -> str | None:
    """An AnyValueView or AnyValueBytesView as key text (bytes that are not UTF-8 escaped);
    None when it has no value or an unsupported type."""
    which = value.WhichOneof("value")
    if which == "string_value":
        text: str | bytes = value.string_value
        return text if isinstance(text, str) else text.decode("utf-8", "backslashreplace")
    if which == "int_value":
        return str(value.int_value)
    if which == "bool_value":
        return "true" if value.bool_value else "false"
    if which == "double_value":
        return repr(value.double_value)
    return None


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
        owns_cluster: Callable[[str], bool] | None = None,
        accelerate: bool = True,
    ) -> None:
        # The C scan and loop of the fast path when built (ACCELERATED); False: Python only.
        wire = _wire if accelerate else None
        self._scan: Callable[[bytes], Any] | None = wire.scan if wire is not None else None
        self._classify: Callable[..., Any] | None = wire.classify if wire is not None else None
        # Sharding: a resource of a cluster this shard does not own is refused whole
        # (not_owned), whatever its rules; None owns every cluster.
        self._owns_cluster = owns_cluster
        self._rules = [r for r in rules if r.enabled]
        self._groups: list[tuple[str, ...]] = sorted({r.metrics for r in self._rules})
        self._rule_group = [self._groups.index(r.metrics) for r in self._rules]
        self._rule_ids = [r.id for r in self._rules]
        self._needed = tuple(sorted({f for r in self._rules for f in r.key_fields}))
        self._max_field = max_key_field_bytes
        self._key_fields = [r.key_fields for r in self._rules]
        self._key_getters = [_key_getter(fields) for fields in self._key_fields]
        self._no_keys: tuple[None, ...] = (None,) * len(self._rules)
        self._invalid = _Resource(
            keys=self._no_keys,
            why=((INVALID, ""),) * len(self._rules),
            refused=(INVALID, ""),
        )
        self._names = _BoundedCache(10_000)
        self._single: dict[bytes, tuple[bool, ...]] = {}
        self._resources = _BoundedCache(resource_cache)
        self._durable = durable
        self._counted_by_all: set[bytes] = set()  # metric names every rule counts

    @property
    def cached_resources(self) -> int:
        return len(self._resources)

    # -- metric name matching ---------------------------------------------------------------

    def _name_groups(self, name: bytes) -> tuple[bool, ...]:
        """Per glob group, whether it matches the metric `name` (bytes as on the wire: a name
        that is not UTF-8 is matched in its backslash-escaped form)."""
        hit = self._single.get(name)
        if hit is None:
            text = name.decode("utf-8", "backslashreplace")
            hit = tuple(any(fnmatchcase(text, g) for g in globs) for globs in self._groups)
            if len(self._single) < 10_000:  # metric names are few; bound it regardless
                self._single[name] = hit
        return hit

    def _match(self, names: tuple[bytes, ...]) -> tuple[int, ...]:
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

    def _keys(self, raw: bytes) -> _Resource:
        """The Resource's keys per rule and host.name, cached by its bytes."""
        cache_key = (hash(raw), len(raw))
        cached: _Resource | None = self._resources.get(cache_key)
        if cached is not None:
            return cached
        result = self._decode_keys(raw)
        self._resources.put(cache_key, result)
        return result

    def _decode_keys(self, raw: bytes) -> _Resource:
        attributes: Mapping[str, Any] | None
        try:
            attributes = ResourceView.FromString(raw).attributes
        except (DecodeError, RecursionError, ValueError):
            attributes = _listed_attributes(raw)  # not UTF-8 somewhere, or not a Resource
            if attributes is None:
                return self._invalid
        values: dict[str, str] = {}
        unsupported: set[str] = set()
        refused: tuple[str, str] | None = None
        for name in self._needed:
            if name not in attributes:
                continue
            v = attributes[name]
            which = v.WhichOneof("value")
            if which == "string_value":  # inline: the common case, once per field
                text = v.string_value
                if isinstance(text, bytes):  # the fallback view: escape what is not UTF-8
                    text = text.decode("utf-8", "backslashreplace")
            else:
                other = _text(v)
                if other is None:
                    if which is not None:
                        unsupported.add(name)
                    continue
                text = other
            if len(text) * 4 > self._max_field and len(text.encode()) > self._max_field:
                refused = refused or (TOO_LONG, name)
            elif text:
                values[name] = text
        host = values.get(HOST_FIELD)
        if host is None and HOST_FIELD not in self._needed and HOST_FIELD in attributes:
            host = _text(attributes[HOST_FIELD])  # for the host filter only
            if host is not None and len(host.encode()) > self._max_field:
                host = None  # never in a certificate: refused by any host filter
        if refused is not None:
            return _Resource(self._no_keys, (refused,) * len(self._rules), host or "", refused)
        if self._owns_cluster is not None:
            cluster = values.get(CLUSTER_FIELD)
            if cluster is None and CLUSTER_FIELD in attributes:
                cluster = _text(attributes[CLUSTER_FIELD])
            if not self._owns_cluster(cluster or ""):
                not_owned = (NOT_OWNED, CLUSTER_FIELD, (cluster or "")[:_EXAMPLE_CHARS])
                return _Resource(
                    self._no_keys, ((NOT_OWNED, CLUSTER_FIELD),) * len(self._rules), host or "",
                    not_owned,
                )  # fmt: skip
        keys: list[KeyTuple | None] = []
        for key_of in self._key_getters:
            try:
                keys.append(key_of(values))
            except KeyError:  # `values` holds only non-empty fields
                keys.append(None)
        if None not in keys:
            return _new_resource(_Resource, (tuple(keys), self._no_keys, host or "", None, True))
        why = tuple(
            None
            if key is not None
            else next(
                (UNSUPPORTED_TYPE if f in unsupported else MISSING_FIELD, f)
                for f in fields
                if f not in values
            )
            for key, fields in zip(keys, self._key_fields, strict=True)
        )
        return _Resource(tuple(keys), why, host or "", None, False)

    # -- decoding -------------------------------------------------------------------------

    def decode_message(
        self, request: ExportMetricsServiceRequest, bounds: TimeBounds
    ) -> DecodeResult:
        return self.decode(request.SerializeToString(), bounds)

    def decode(
        self, data: bytes, bounds: TimeBounds, host_filter: Callable[[str], bool] | None = None
    ) -> DecodeResult:
        """Decode `data`. Raises InvalidRequest when it is not a valid request message.

        With `host_filter`, a resource whose host.name it refuses, or that has no host.name, is
        not stored: its points are rejected and it counts as untracked (host_mismatch). This is
        identity binding under mTLS. Such requests skip the fast path, which does not look at
        Resources and so could not refuse one."""
        if self._durable is not None and self._rules and host_filter is None:
            known = self._decode_known(data, bounds)
            if known is not None:
                return known
        return self._decode_full(data, bounds, host_filter)

    def _counted_everywhere(self, names: set[bytes]) -> bool:
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

        Nothing new: every metric is counted by every rule, every point has a timestamp, lies
        in one minute and inside the accepted range, and every Resource is durable and tracked
        for that minute from the request's earliest point on. A ResourceMetrics without points
        or without a Resource makes no observation either way, so the merged lists decide
        exactly. Untracked Resources are decoded like new ones, for their points to be
        rejected with a reason.
        """
        assert self._durable is not None
        scanned = self._scan(data) if self._scan is not None else None
        if scanned is not None:  # the accelerator read it in one pass (_wirescan.c)
            raws, names, times, values, lo, hi, with_points, spans = scanned
            if not raws or not times or values > times or not self._counted_everywhere(names):
                return None
            return self._known(data, bounds, raws, times, lo, hi, with_points, spans)
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
        g, s = metrics.gauge.data_points, metrics.sum.data_points
        gauge, total = g.time_unix_nano, s.time_unix_nano
        points = len(gauge) + len(total)
        if (
            not points
            or len(g.as_double) + len(g.as_int) + len(s.as_double) + len(s.as_int) > points
        ):
            return None  # no points, or more values than timestamps: some have none
        stamps = set(gauge)  # one pass in C; a scrape's points share a few timestamps
        stamps.update(total)
        return self._known(data, bounds, raws, points, min(stamps), max(stamps), None, None)

    def _known(
        self,
        data: bytes,
        bounds: TimeBounds,
        raws: Sequence[bytes],
        points: int,
        lo: int,
        hi: int,
        with_points: bytes | None,
        spans: bytes | None,
    ) -> DecodeResult | None:
        """`_decode_known` once the request is read: its Resources (`raws`, one per
        ResourceMetrics when `with_points` is given, which then says which have points, and
        `spans` where each ResourceMetrics lies in `data`), its `points` and their earliest
        and latest timestamps."""
        assert self._durable is not None
        minute = lo // MINUTE_NS
        if (
            hi // MINUTE_NS != minute
            or not lo
            or lo < bounds.oldest_ms * 1_000_000
            or hi > bounds.newest_ms * 1_000_000 + 999_999
        ):
            return None
        earliest_ms = lo // 1_000_000
        # One timestamp for every point (the hostmetrics scrapers stamp a scrape once): then
        # a key's extension carries exactly its own first and last point.
        previous = minute - 1 if lo == hi else -1
        durable = self._durable
        classified: Any = NotImplemented
        if self._classify is not None and with_points is not None:
            classified = self._classify(
                raws, durable.entries, durable.kept_keys, minute, earliest_ms, previous,
                with_points,
            )  # fmt: skip
        if classified is NotImplemented:
            classified = self._classify_py(data, raws, minute, earliest_ms, previous, with_points)
        if classified is None:
            return None  # mostly new processes: the full path is cheaper
        tracked, new, resources = classified
        result = DecodeResult()
        if resources:
            result.extension = Extension(earliest_ms, tuple(resources))
        taken = self._take_new(data, raws, new, bounds, result, spans) if new else 0
        if taken is None:
            return None
        result.points_accepted += points - taken
        result.resources_tracked += tracked
        return result

    def _classify_py(
        self,
        data: bytes,
        raws: Sequence[bytes],
        minute: int,
        earliest_ms: int,
        previous: int,
        with_points: bytes | None,
    ) -> tuple[int, list[int], list[tuple[int, tuple[bytes, ...]]]] | None:
        """Per Resource, by its DurableResources entry: tracked (durable for `minute` from
        `earliest_ms` on), extending (durable for `previous`, with kept keys and points) or
        new. Returns the tracked count (extensions included), the new positions (ascending)
        and the extension's (fingerprint, keys) pairs; None when more than a quarter are new
        or the ResourceMetrics cannot be lined up with `raws` (the full path decides). The
        accelerator's `classify` does the same in C."""
        assert self._durable is not None
        fingerprints = list(map(hash, raws))
        values = list(map(self._durable.get, fingerprints))
        limit = len(values) // _MAX_NEW_SHARE
        new: list[int] = []
        extending: list[int] = []
        tracked = 0
        for i, value in enumerate(values):
            if value is None or not value & 1:
                new.append(i)
                if len(new) > limit:
                    return None
            elif covers(value, minute, earliest_ms):
                tracked += 1
            elif (value >> 1) // 60_000 == previous:
                extending.append(i)
            else:
                new.append(i)
                if len(new) > limit:
                    return None
        resources: list[tuple[int, tuple[bytes, ...]]] = []
        if extending:
            # The flat view cannot tell a ResourceMetrics without points (no observation)
            # from one with points: the merged view, one list per ResourceMetrics, can.
            if with_points is None:
                with_points = _points_per_resource(data, raws)
                if with_points is None:
                    return None
            keys_of = self._durable.keys_of
            for i in extending:
                keys = keys_of(fingerprints[i])
                if keys is None or not with_points[i]:
                    new.append(i)
                else:
                    resources.append((fingerprints[i], keys))
            if len(new) > limit:
                return None
            new.sort()
        return tracked + len(resources), new, resources

    def _take_new(
        self,
        data: bytes,
        raws: Sequence[bytes],
        new: list[int],
        bounds: TimeBounds,
        result: DecodeResult,
        spans: bytes | None,
    ) -> int | None:
        """Decode only the ResourceMetrics at positions `new` of the flat resource list into
        `result`; returns their points, or None when positions cannot be trusted to name
        ResourceMetrics (then the caller takes the full path, with a fresh result).

        Trusted when the request has as many ResourceMetrics as Resources, no Resource twice,
        and the ResourceMetrics at each new position holds that Resource: then every
        ResourceMetrics whose Resource is new sits at one of these positions. With `spans`
        (the accelerator's: one Resource per ResourceMetrics, and where each lies), the
        ResourceMetrics are cut from `data` instead of read through the raw view.
        """
        if len(set(raws)) != len(raws):
            return None
        rm_at: Callable[[int], bytes]
        if spans is not None:
            if len(spans) != _SPAN.size * len(raws):
                return None

            def rm_at(i: int) -> bytes:
                start, end = _SPAN.unpack_from(spans, _SPAN.size * i)
                return data[start:end]
        else:
            try:
                rms = RawRequest.FromString(data).resource_metrics
            except (DecodeError, RecursionError, ValueError):
                return None
            if len(rms) != len(raws):
                return None
            rm_at = rms.__getitem__
        window = (bounds.oldest_ms * 1_000_000, bounds.newest_ms * 1_000_000 + 999_999)
        taken = 0
        for i in new:
            raw_rm = rm_at(i)
            try:
                rm = MergedResourceMetrics.FromString(raw_rm)
            except (DecodeError, RecursionError, ValueError):
                return None
            if rm.resource != raws[i]:
                return None
            view = functools.partial(MetricResourceMetrics.FromString, raw_rm)
            taken += self._take(rm, view, window, result, None)
        return taken

    def _decode_full(
        self, data: bytes, bounds: TimeBounds, host_filter: Callable[[str], bool] | None
    ) -> DecodeResult:
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
            self._take(rm, functools.partial(metric_view, index), window, result, host_filter)
        return result

    def _take(
        self,
        rm: Any,
        metric_view: Callable[[], Any],
        window: tuple[int, int],
        result: DecodeResult,
        host_filter: Callable[[str], bool] | None,
    ) -> int:
        """Decode one ResourceMetrics (a MergedResourceMetrics) into `result`; returns its
        counted points. `metric_view` gives it metric by metric, for a mixed resource."""
        merged = rm.scope_metrics.metrics
        status = self._match(tuple(merged.name))
        if _MIXED in status:
            stamps, counted, zero = self._times_by_metric(metric_view())
        elif _ALL in status:
            lists = []
            present = 0
            for f, v in merged.ListFields():
                number = f.number
                if number == 1:
                    continue
                dp = v.data_points
                times = dp.time_unix_nano
                lists.append(times)
                if number < 9:  # gauge (5), sum (7): counted by value (inline: per resource)
                    present += len(dp.as_double) + len(dp.as_int)
                else:
                    present += max(len(dp.start_time_unix_nano), len(times))
            counted = lists[0] if len(lists) == 1 else [t for lst in lists for t in lst]
            zero = max(0, present - len(counted))
            stamps = [counted if s == _ALL else [] for s in status]
        else:
            result.resources_ignored += 1
            return 0
        npoints = len(counted) + zero
        if not npoints:
            result.resources_ignored += 1
            return 0
        raw = rm.resource
        info = self._keys(raw)
        refused = info.refused
        if (
            host_filter is not None
            and (refused is None or refused[0] != INVALID)
            and not (info.host and host_filter(info.host))
        ):
            result.refuse(HOST_MISMATCH, HOST_FIELD, npoints, info.host)
            return npoints
        if refused is not None:
            result.refuse(refused[0], refused[1], npoints, refused[2] if len(refused) > 2 else "")
            return npoints
        if not info.complete:
            counting = [i for i, g in enumerate(self._rule_group) if status[g] != _NONE]
            if all(info.keys[i] is None for i in counting):
                reason, attribute = info.why[counting[0]] or (MISSING_FIELD, "")
                result.refuse(reason, attribute, npoints)
                return npoints
        result.resources_tracked += 1
        result.points_zero_timestamp += zero
        total = npoints
        npoints -= zero
        distinct = set(counted)
        if not distinct:
            return total
        oldest_ns, newest_ns = window
        lo, hi = min(distinct), max(distinct)
        single_minute = lo // MINUTE_NS == hi // MINUTE_NS
        if lo < oldest_ns or hi > newest_ns or not lo:
            single_minute = False
            written_zero = sum(1 for t in counted if not t)  # a 0 written out on the wire
            old = sum(1 for t in counted if 0 < t < oldest_ns)
            future = sum(1 for t in counted if t > newest_ns)
            result.points_zero_timestamp += written_zero
            result.points_too_old += old
            result.points_future += future
            npoints -= written_zero + old + future
            lo_ok = max(oldest_ns, 1)
            stamps = [[t for t in lst if lo_ok <= t <= newest_ns] for lst in stamps]
            distinct = {t for t in distinct if lo_ok <= t <= newest_ns}
        result.points_accepted += npoints
        batch = result.batch
        stored: list[RuleKey] = []
        for key, g, rule_id in zip(info.keys, self._rule_group, self._rule_ids, strict=True):
            if key is None or not stamps[g]:
                continue
            stored.append((rule_id, key))
            sighting = batch.get((rule_id, key))
            if sighting is None:
                sighting = batch[(rule_id, key)] = Sighting()
            for t in distinct if stamps[g] is counted else set(stamps[g]):
                sighting.add(t // 1_000_000)
        # Only a resource that every rule counts in full is marked: the fast path holds only
        # requests whose every metric every rule counts.
        if (
            single_minute
            and stored
            and self._durable is not None
            and all(x == _ALL for x in status)
        ):
            mark = Mark(hash(raw), lo // MINUTE_NS, lo // 1_000_000, tuple(stored))
            result.marks.append(mark)
        return total

    def _times_by_metric(self, rm: Any) -> tuple[list[list[int]], list[int], int]:
        """Timestamps per glob group, of every counted point (a point of a metric that at
        least one group matches), and how many counted points have no timestamp, metric by
        metric: the fallback for mixed resources."""
        out: list[list[int]] = [[] for _ in self._groups]
        counted: list[int] = []
        zero = 0
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                hits = self._name_groups(metric.name)
                if not any(hits):
                    continue
                points: list[int] = []
                for kind in _NUMBER_KINDS + _OTHER_KINDS:
                    dp = getattr(metric, kind).data_points
                    times = dp.time_unix_nano
                    points.extend(times)
                    zero += max(0, _present(dp, kind) - len(times))
                counted.extend(points)
                for g, hit in enumerate(hits):
                    if hit:
                        out[g].extend(points)
        return out, counted, zero


def _present(dp: Any, kind: str) -> int:
    """How many points a merged data point list holds, timestamps or not (otlpview.proto)."""
    if kind in _NUMBER_KINDS:
        return len(dp.as_double) + len(dp.as_int)
    return max(len(dp.start_time_unix_nano), len(dp.time_unix_nano))


def _points_per_resource(data: bytes, raws: Sequence[bytes]) -> bytes | None:
    """Per ResourceMetrics, 1 when it has a gauge or sum point with a timestamp (the merged
    view), or None when the ResourceMetrics do not line up with `raws` (one Resource each)."""
    try:
        rms = MergedRequest.FromString(data).resource_metrics
    except (DecodeError, RecursionError, ValueError):
        return None
    if len(rms) != len(raws):
        return None
    flags = bytearray(len(rms))
    for i, rm in enumerate(rms):
        if rm.resource != raws[i]:
            return None  # positions do not name ResourceMetrics
        merged = rm.scope_metrics.metrics
        if merged.gauge.data_points.time_unix_nano or merged.sum.data_points.time_unix_nano:
            flags[i] = 1
    return bytes(flags)
