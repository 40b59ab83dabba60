"""The catalogue of every Prometheus metric pathwatch exports: name, type, help and labels.

One `Metrics` object per service, on its own registry, so tests can run several services in one
process. Labels are bounded by configuration (rule ids, sink names, fixed outcome words): never a
host, path or pid, which would make cardinality follow the fleet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

# One sample of another process's registry: family name, family type, sample name, labels, value.
ForeignSample = tuple[str, str, str, tuple[tuple[str, str], ...], float]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SIZE_BUCKETS = (1 << 10, 1 << 13, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: str
    help: str
    labels: tuple[str, ...]


class Metrics:
    """All metrics of one service instance."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.specs: list[MetricSpec] = []
        self._sources: list[Callable[[], Iterable[ForeignSample]]] = []
        r = self.registry

        # Ingest (receiver)
        self.export_requests = self._counter(
            "pathwatch_export_requests_total",
            "OTLP Export requests, by outcome (ok, partial, invalid, unavailable, "
            "unauthenticated).",
            ("outcome",),
        )
        self.resources = self._counter(
            "pathwatch_resources_total",
            "Resources received, by outcome: tracked (a key for at least one rule), untracked "
            "(process metrics but no key: see pathwatch_resources_untracked_total for why), "
            "ignored (no process metrics).",
            ("outcome",),
        )
        self.resources_untracked = self._counter(
            "pathwatch_resources_untracked_total",
            "Resources with process metrics that yield no key, by reason: missing_field (a key "
            "field absent or empty), unsupported_type (a key field of a type other than string, "
            "int, bool or double), too_long (a key field over receiver.max_key_field_bytes), "
            "invalid (Resource bytes that do not decode), host_mismatch (host.name not in the "
            "client certificate, require_host_match), not_owned (a cluster this shard does not "
            "own, shard.clusters).",
            ("reason",),
        )
        self.data_points = self._counter(
            "pathwatch_data_points_total",
            "Data points of tracked metrics, by outcome: accepted, too_old, too_far_in_future, "
            "zero_timestamp, key_too_long, host_mismatch.",
            ("outcome",),
        )
        self.late_points = self._counter(
            "pathwatch_late_observations_total",
            "Observations of a new minute of a key that arrived late, by outcome: untrusted "
            "(later than receiver.max_baseline_lateness: never counts as baseline), after_tick "
            "(in the window of a tick that already ran: checked again at the next tick).",
            ("outcome",),
        )
        self.late_alerts = self._counter(
            "pathwatch_late_alerts_total",
            "Alerts raised for late data at the tick after it arrived (marked late), by rule.",
            ("rule",),
        )
        self.receiver_overload = self._counter(
            "pathwatch_receiver_overload_total",
            "Requests answered 'retry later' because a receiver bound was reached, by receiver "
            "(grpc, http, admin) and reason (workers, json_decodes, connections, read_timeout).",
            ("receiver", "reason"),
        )
        self.token_reload_failures = self._counter(
            "pathwatch_token_reload_failures_total",
            "Bearer token files that were missing or empty when re-read; the last good token "
            "stays in force.",
            ("listener",),
        )
        self.export_bytes = Histogram(
            "pathwatch_export_request_bytes",
            "Size of Export requests after decompression.",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self._spec("pathwatch_export_request_bytes", "histogram", self.export_bytes, ())
        self.export_seconds = Histogram(
            "pathwatch_export_duration_seconds",
            "Time to handle one Export request, decoding to durable write.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._spec("pathwatch_export_duration_seconds", "histogram", self.export_seconds, ())

        # Store
        self.store_pending_keys = self._gauge(
            "pathwatch_store_pending_keys", "Keys queued for the writer (bounded).", ()
        )
        self.store_keys_written = self._counter(
            "pathwatch_store_keys_written_total", "Key records written.", ()
        )
        self.store_keys_created = self._counter(
            "pathwatch_store_keys_created_total", "Keys stored for the first time.", ()
        )
        self.store_minutes_logged = self._counter(
            "pathwatch_store_minutes_logged_total",
            "Minutes of running processes logged instead of written into their key records "
            "(a minute right after a stored one; folded later, see store.fold_interval).",
            (),
        )
        self.store_keys_pending_fold = self._gauge(
            "pathwatch_store_keys_pending_fold",
            "Keys with logged minutes not yet folded into their records.",
            (),
        )
        self.store_fold_seconds = self._counter(
            "pathwatch_store_fold_seconds_total",
            "Time the writer spent folding logged minutes into key records.",
            (),
        )
        self.store_write_errors = self._counter(
            "pathwatch_store_write_errors_total", "Write batches RocksDB refused.", ()
        )
        self.store_keys_expired = self._counter(
            "pathwatch_store_keys_expired_total",
            'Keys removed after their retention horizon (rule "*": counted by the keyspace '
            "sweep over all rules).",
            ("rule",),
        )
        self.store_write_seconds = Histogram(
            "pathwatch_store_write_batch_seconds",
            "Time to merge and durably commit one write batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._spec("pathwatch_store_write_batch_seconds", "histogram", self.store_write_seconds, ())
        self.store_size_bytes = self._gauge(
            "pathwatch_store_size_bytes", "RocksDB live SST file size estimate.", ()
        )
        self.store_keys = self._gauge(
            "pathwatch_store_keys", "Keys stored, by rule (exact).", ("rule",)
        )
        self.store_keys_estimate = self._gauge(
            "pathwatch_store_keys_estimate",
            "RocksDB estimate of entries (records, indexes and outbox).",
            (),
        )
        self.store_memory_bytes = self._gauge(
            "pathwatch_store_memory_bytes",
            "RocksDB memory by part: block_cache (data, index and filter blocks), memtables, "
            "table_readers.",
            ("part",),
        )
        self.cache_entries = self._gauge(
            "pathwatch_cache_entries",
            "Entries in pathwatch's bounded in-memory caches: keys (store.cache_keys), "
            "resources (receiver.resource_cache), durable (receiver.durable_resources).",
            ("cache",),
        )

        # Rules
        self.evaluations = self._counter(
            "pathwatch_evaluations_total",
            "Rule evaluations, by rule and outcome (ok, error).",
            ("rule", "outcome"),
        )
        self.evaluation_seconds = Histogram(
            "pathwatch_evaluation_duration_seconds",
            "Time to evaluate one rule at one tick.",
            ("rule",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._spec(
            "pathwatch_evaluation_duration_seconds", "histogram", self.evaluation_seconds, ("rule",)
        )
        self.alerts = self._counter("pathwatch_alerts_total", "Risk events produced.", ("rule",))
        self.alerts_excluded = self._counter(
            "pathwatch_alerts_excluded_total", "Alerts dropped by a rule's exclude list.", ("rule",)
        )
        self.alerts_summarised = self._counter(
            "pathwatch_alerts_summarised_total",
            "Alerts recorded but not delivered because a tick exceeded max_alerts_per_tick "
            "(one summary alert is delivered instead).",
            ("rule",),
        )
        self.alerts_gated = self._counter(
            "pathwatch_alerts_gated_total",
            "Findings not alerted, by rule and reason: warmup (fresh install), learning (new "
            "host or cluster), duplicate (already alerted by stream or schedule), suppressed "
            "(suppress_for).",
            ("rule", "reason"),
        )
        self.stream_alerts = self._counter(
            "pathwatch_stream_alerts_total", "Alerts raised in stream mode.", ("rule",)
        )
        self.baseline_complete = self._gauge(
            "pathwatch_baseline_complete",
            "1 once a rule's baseline covers its full length since the first start (and its "
            "warm-up is over), else 0.",
            ("rule",),
        )
        self.clusters_without_baseline = self._gauge(
            "pathwatch_clusters_without_baseline",
            "Clusters the rule's last tick found with no observation before its window (one "
            "no_baseline summary each instead of an alert per key).",
            ("rule",),
        )
        self.keys_refused = self._counter(
            "pathwatch_keys_refused_total",
            "New keys not tracked because a new-key limit was reached.",
            (),
        )
        self.key_limit_hits = self._counter(
            "pathwatch_key_limit_hits_total",
            "New-key limits reached, by scope (host, sender, fleet); each raises one summary "
            "alert; the next tick lists the refused keys.",
            ("scope",),
        )
        self.last_tick = self._gauge(
            "pathwatch_last_tick_timestamp_seconds",
            "Unix time of the last tick evaluated successfully.",
            ("rule",),
        )
        self.catchup_ticks = self._counter(
            "pathwatch_catchup_ticks_total", "Ticks run late after downtime.", ("rule",)
        )
        self.skipped_ticks = self._counter(
            "pathwatch_skipped_ticks_total",
            "Missed ticks not run because they exceed the catch-up bound.",
            ("rule",),
        )

        # Delivery
        self.deliveries = self._counter(
            "pathwatch_deliveries_total",
            "Delivery attempts by sink and outcome (delivered, retried, failed, dead_lettered).",
            ("sink", "outcome"),
        )
        self.outbox_depth = self._gauge(
            "pathwatch_outbox_depth", "Alerts waiting for delivery, by sink.", ("sink",)
        )
        self.outbox_oldest_age = self._gauge(
            "pathwatch_outbox_oldest_age_seconds",
            "Age of the oldest undelivered alert, by sink (0 when none).",
            ("sink",),
        )
        self.outbox_full = self._counter(
            "pathwatch_outbox_full_total",
            "Alerts not queued for a sink because its outbox was full.",
            ("sink",),
        )
        self.deadletters = self._gauge(
            "pathwatch_deadletters", "Dead letters kept, by sink.", ("sink",)
        )
        self.delivery_seconds = Histogram(
            "pathwatch_delivery_duration_seconds",
            "Time of one delivery request, by sink.",
            ("sink",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._spec(
            "pathwatch_delivery_duration_seconds", "histogram", self.delivery_seconds, ("sink",)
        )
        self.sink_disabled = self._gauge(
            "pathwatch_sink_disabled", "1 when a sink was disabled (HTTP 410 Gone).", ("sink",)
        )

        self.build_info = self._gauge(
            "pathwatch_build_info",
            "1, labelled with pathwatch's version and how the receiver's fast path reads "
            'requests: fast_path="c" with the optional C accelerator built, "python" without it '
            "(a machine with no C compiler at install time, or PATHWATCH_PURE_PYTHON=1).",
            ("version", "fast_path"),
        )
        self.shard_info = self._gauge(
            "pathwatch_shard_info",
            "1, labelled with this pathwatch's shard name and the clusters it owns (shard.name, "
            "shard.clusters; empty: all).",
            ("shard", "clusters"),
        )

        # Supervision and housekeeping
        self.component_failures = self._counter(
            "pathwatch_component_failures_total",
            "Unexpected exceptions in a long-lived component (writer, scheduler, sink:<name>, "
            "expiry, stream, admin, grpc-worker-<n>: a receiver worker process that exited); "
            "each is logged with its stack and the component restarted with backoff.",
            ("component",),
        )
        self.component_up = self._gauge(
            "pathwatch_component_up",
            "1 while a supervised component runs, 0 while it is down (restarting or given up).",
            ("component",),
        )
        self.quarantined_keys = self._gauge(
            "pathwatch_quarantined_keys",
            "Key records that cannot be read (corrupt or from a newer release): set aside, "
            "listed by GET /api/v1/quarantine; ingest goes on for every other key.",
            (),
        )
        self.keyspace_swept = self._counter(
            "pathwatch_keyspace_entries_swept_total",
            "Entries removed by the expiry sweep, by keyspace tag (R, A, E, G, P, N, H, S, D, "
            "Z, F, T, L, I, rule) once past their owner's retention.",
            ("keyspace",),
        )
        self.stream_queue_depth = self._gauge(
            "pathwatch_stream_queue_depth",
            "Stream-mode hits waiting for the publisher (bounded; past it, the scheduled tick "
            "alerts them instead).",
            (),
        )

    # -- other processes (receiver workers) ---------------------------------------------------

    def add_source(self, source: Callable[[], Iterable[ForeignSample]]) -> None:
        """Samples that other processes of this service counted (receiver workers): added
        to this registry's samples of the same name and labels in `exposition`."""
        self._sources.append(source)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of this service, every process's samples summed."""
        if not self._sources:
            return generate_latest(self.registry)
        return generate_latest(_Summed(self.registry, self._sources))

    def _spec(self, name: str, kind: str, _metric: object, labels: tuple[str, ...]) -> None:
        doc = getattr(_metric, "_documentation", "")
        self.specs.append(MetricSpec(name, kind, str(doc), labels))

    def _counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Counter:
        metric = Counter(name.removesuffix("_total"), doc, labels, registry=self.registry)
        self.specs.append(MetricSpec(name, "counter", doc, labels))
        return metric

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
        metric = Gauge(name, doc, labels, registry=self.registry)
        self.specs.append(MetricSpec(name, "gauge", doc, labels))
        return metric


def foreign_samples(registry: CollectorRegistry) -> list[ForeignSample]:
    """The non-zero samples of `registry`, to be summed into another process's exposition."""
    out: list[ForeignSample] = []
    for family in registry.collect():
        for sample in family.samples:
            if sample.value and not sample.name.endswith("_created"):
                labels = tuple(sorted(sample.labels.items()))
                out.append((family.name, family.type, sample.name, labels, float(sample.value)))
    return out


class RetiredSamples:
    """Counter and histogram samples of processes that exited: kept, so that totals summed
    over processes never go down when a worker is replaced. Gauges are dropped with their
    process. Bounded by the metric catalogue (labels are bounded by configuration)."""

    def __init__(self) -> None:
        self._totals: dict[tuple[str, str, str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()

    def retire(self, samples: Iterable[ForeignSample]) -> None:
        with self._lock:
            for family, kind, name, labels, value in samples:
                if kind in ("counter", "histogram"):
                    key = (family, kind, name, labels)
                    self._totals[key] = self._totals.get(key, 0.0) + value

    def samples(self) -> list[ForeignSample]:
        with self._lock:
            return [(*key, value) for key, value in self._totals.items()]


class _Summed(CollectorRegistry):
    """A registry view: `registry`'s families with the foreign samples added."""

    def __init__(
        self, registry: CollectorRegistry, sources: list[Callable[[], Iterable[ForeignSample]]]
    ) -> None:
        super().__init__(auto_describe=False)
        self._registry = registry
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        extra: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for source in self._sources:
            for family_name, _kind, name, labels, value in source():
                by_sample = extra.setdefault(family_name, {})
                by_sample[(name, labels)] = by_sample.get((name, labels), 0.0) + value
        for family in self._registry.collect():
            add = extra.get(family.name)
            if not add:
                yield family
                continue
            summed = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                more = add.pop((sample.name, tuple(sorted(sample.labels.items()))), None)
                summed.samples.append(
                    sample if more is None else sample._replace(value=sample.value + more)
                )
            for (name, labels), rest in add.items():  # label sets only other processes have
                summed.samples.append(Sample(name, dict(labels), rest))
            yield summed
