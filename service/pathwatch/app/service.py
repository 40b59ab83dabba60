"""Service: builds every component from a Config, starts them in order, stops them in reverse.

Start: store -> writer -> dispatcher -> receiver -> scheduler -> admin HTTP. Shutdown reverses
it: the receiver stops accepting and finishes in-flight exports, the writer flushes what it has,
the dispatcher stops between requests, RocksDB closes last. Every step is bounded in time.
"""

from __future__ import annotations

import fnmatch
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from pathwatch import __version__
from pathwatch.access import BearerToken, TlsFiles, tls_files
from pathwatch.alerts.context import Explainer
from pathwatch.alerts.dispatcher import Dispatcher
from pathwatch.alerts.event import key_limit_event
from pathwatch.alerts.gates import AlertGates
from pathwatch.app.workers import WORKERS_SERVICE_DURABLE, GrpcWorkers
from pathwatch.clock import MINUTE_MS, Clock, SystemClock
from pathwatch.config.model import AuthConfig, Config, TlsConfig
from pathwatch.receiver.decode import ACCELERATED, Decoder, TimeBounds, accepted_times
from pathwatch.receiver.grpc_server import OtlpGrpcReceiver
from pathwatch.receiver.http_server import OtlpHttpReceiver
from pathwatch.rules import Rule, resolve_rules
from pathwatch.rules.model import CLUSTER_FIELD, HOST_FIELD
from pathwatch.scheduler import Scheduler, TickRunner
from pathwatch.scheduler.scheduler import next_tick
from pathwatch.scheduler.stream import StreamPublisher
from pathwatch.store import (
    AlertStore,
    Database,
    DatabaseOptions,
    FirstSeenStore,
    IngestWriter,
    Retention,
    WriterConfig,
)
from pathwatch.store.durable import DurableResources
from pathwatch.store.firstseen import StreamHit
from pathwatch.store.guard import LimitHit, NewKeyGuard
from pathwatch.store.sweep import KeyspaceSweeper, SweepPolicy
from pathwatch.store.writer import TickWatermarks
from pathwatch.supervision import Supervisor
from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="app")

INDEX_EXTRA_MINUTES = 3 * 24 * 60  # activity index kept beyond the window: the evaluate API's reach


def retention_of(rule: Rule, max_runs: int, lateness_ms: int = 0) -> Retention:
    """How the store keeps `rule`'s data. `lateness_ms` is receiver.max_baseline_lateness for
    live ingest; replay and baseline import are trusted history (0: every minute trusted)."""
    return Retention(
        horizon_minutes=rule.baseline_minutes + rule.window_minutes + 24 * 60,
        max_runs=max_runs,
        index_minutes=rule.window_minutes + INDEX_EXTRA_MINUTES,
        stream=rule.mode == "stream",
        window_minutes=rule.window_minutes,
        baseline_minutes=rule.baseline_minutes,
        onset_gap_minutes=max(0, rule.baseline_minutes - rule.window_minutes),
        lateness_ms=lateness_ms,
    )


def owns_cluster(patterns: list[str]) -> Callable[[str], bool] | None:
    """The shard's ownership test: a cluster name matching one of `patterns` (names or
    shell-style globs, case-sensitive); None (owns all) when there are none."""
    if not patterns:
        return None
    exact = frozenset(p for p in patterns if not any(c in p for c in "*?["))
    globs = [p for p in patterns if p not in exact]

    def owns(cluster: str) -> bool:
        return cluster in exact or any(fnmatch.fnmatchcase(cluster, g) for g in globs)

    return owns


def check_access(config: Config) -> None:
    """Load every token and TLS file once. Raises AccessConfigError (a ValueError) naming
    the setting when one cannot be used."""
    for where, auth, tls in (
        ("receiver.grpc", config.receiver.grpc.auth, config.receiver.grpc.tls),
        ("receiver.http", config.receiver.http.auth, config.receiver.http.tls),
        ("http", config.http.auth, config.http.tls),
    ):
        bearer_token(auth, where)
        files = tls_of(tls, where)
        if files is not None:
            files.server_context()


def bearer_token(auth: AuthConfig, where: str) -> BearerToken:
    return BearerToken(
        auth.bearer_token,
        auth.bearer_token_file,
        auth.bearer_token_env,
        f"{where}.auth.bearer_token",
    )


def tls_of(tls: TlsConfig, where: str) -> TlsFiles | None:
    return tls_files(tls.cert_file, tls.key_file, tls.client_ca_file, f"{where}.tls")


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    checks: dict[str, str]


class Service:
    """The running pathwatch. `start` raises (StoreError, OSError, ValueError) with a clear
    message when a component cannot start; `shutdown` is safe at any point and twice."""

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.rules: list[Rule] = resolve_rules(config.rules)
        self.enabled_rules = [r for r in self.rules if r.enabled]
        self.metrics = Metrics()
        self._retention = {
            r.id: retention_of(
                r,
                config.store.max_runs_per_key,
                int(config.receiver.max_baseline_lateness * 1000),
            )
            for r in self.enabled_rules
        }
        self.db: Database | None = None
        self.firstseen: FirstSeenStore | None = None
        self.alerts: AlertStore | None = None
        self.writer: IngestWriter | None = None
        self.dispatcher: Dispatcher | None = None
        self.receiver: OtlpGrpcReceiver | GrpcWorkers | None = None
        self.http_receiver: OtlpHttpReceiver | None = None
        self.runner: TickRunner | None = None
        self.scheduler: Scheduler | None = None
        self.http: object | None = None
        self.first_start_ms = 0
        # Resources durable in their latest minute: shared by the receivers (read) and the
        # writer (adds after each commit). Rules are fixed for the process's life. With
        # receiver workers, each worker keeps its own for its connections' resources, and this
        # one serves OTLP/HTTP and the answers to the workers, which read a batch's entries
        # right after its commit: the youngest entries are enough.
        capacity = config.receiver.durable_resources
        if config.receiver.grpc.processes > 1:
            capacity = min(capacity, WORKERS_SERVICE_DURABLE)
        self.durable = DurableResources(capacity)
        self.supervisor = Supervisor(self.metrics)
        self.stream = StreamPublisher(self.metrics)

    @property
    def retention(self) -> dict[str, Retention]:
        """How the store keeps each enabled rule's data (live ingest's lateness included)."""
        return self._retention

    def time_bounds(self) -> TimeBounds:
        return accepted_times(
            self.enabled_rules, float(self.config.receiver.max_future_skew), self.clock.now_ms()
        )

    def open_store(self) -> None:
        cfg = self.config
        self.db = Database(
            cfg.data_dir,
            DatabaseOptions(fsync=cfg.store.fsync, block_cache_bytes=cfg.store.block_cache_size),
        )
        self.firstseen = FirstSeenStore(
            self.db,
            cfg.store.cache_keys,
            NewKeyGuard(
                cfg.limits.new_keys_per_host_per_hour,
                cfg.limits.new_keys_per_hour,
                cfg.limits.new_keys_per_sender_per_hour,
            ),
            {
                r.id: r.key_fields.index(HOST_FIELD)
                for r in self.rules
                if HOST_FIELD in r.key_fields
            },
            {
                r.id: r.key_fields.index(CLUSTER_FIELD)
                for r in self.rules
                if CLUSTER_FIELD in r.key_fields
            },
        )
        # No write before now + the accepted clock skew can have covered a later minute, so
        # an onset index (re)started now is complete from there on.
        complete_from = (
            self.clock.now_ms() + int(cfg.receiver.max_future_skew * 1000)
        ) // MINUTE_MS + 1
        for rule in self.enabled_rules:
            self.firstseen.set_context_fields(rule.id, rule.key_fields)
            gap = self._retention[rule.id].onset_gap_minutes
            if gap > 0:
                self.firstseen.prepare_onsets(rule.id, gap, complete_from)
        self.alerts = AlertStore(self.db)
        first = self.alerts.get_meta("first_start_ms")
        if first is None:
            self.first_start_ms = self.clock.now_ms()
            self.alerts.set_meta("first_start_ms", str(self.first_start_ms))
        else:
            self.first_start_ms = int(first)

    def start(self, *, serve_http: bool = True) -> None:
        cfg = self.config
        started = time.monotonic()
        self.open_store()
        assert self.firstseen is not None and self.alerts is not None and self.db is not None
        db = self.db
        self.metrics.store_size_bytes.set_function(
            lambda: db.property_int("rocksdb.live-sst-files-size")
        )
        firstseen = self.firstseen
        for rule in self.enabled_rules:
            self.metrics.store_keys.labels(rule=rule.id).set_function(
                functools.partial(firstseen.key_count, rule.id)
            )
        self.metrics.store_keys_estimate.set_function(
            lambda: db.property_int("rocksdb.estimate-num-keys")
        )
        for part, prop in (
            ("block_cache", "rocksdb.block-cache-usage"),
            ("memtables", "rocksdb.cur-size-all-mem-tables"),
            ("table_readers", "rocksdb.estimate-table-readers-mem"),
        ):
            self.metrics.store_memory_bytes.labels(part=part).set_function(
                functools.partial(db.property_int, prop)
            )
        for rule in self.enabled_rules:  # read at every scrape, not only by the API
            self.metrics.baseline_complete.labels(rule=rule.id).set_function(
                functools.partial(self._baseline_complete, rule)
            )
        cache = self.metrics.cache_entries
        cache.labels(cache="keys").set_function(lambda: firstseen.cached_keys)
        cache.labels(cache="durable").set_function(functools.partial(len, self.durable))
        self.metrics.quarantined_keys.set_function(lambda: len(firstseen.quarantined(100_000)))
        # Ticks recorded before this start may have read the store: writes into their windows
        # are late from the first write on.
        watermarks = TickWatermarks()
        for rule in self.enabled_rules:
            last = self.alerts.last_tick(rule.id)
            if last is not None:
                watermarks.advance(rule.id, last.tick_ms)
        self.writer = IngestWriter(
            self.firstseen,
            lambda: self._retention,
            self.clock,
            self.metrics,
            WriterConfig(
                max_pending_keys=cfg.store.max_pending_keys,
                expiry_interval_s=cfg.store.expiry_interval,
                fold_interval_s=cfg.store.fold_interval,
            ),
            # Off the write path: the writer only queues them (bounded) for the publisher.
            on_limit=lambda hits: self.stream.offer(
                functools.partial(self._on_key_limit, hits), len(hits)
            ),
            on_stream=lambda hits: self.stream.offer(
                functools.partial(self._on_stream, hits), len(hits)
            ),
            durable=self.durable,
            watermarks=watermarks,
            sweeper=KeyspaceSweeper(
                self.firstseen,
                self.db,
                SweepPolicy(
                    suppress_for_ms={
                        r.id: r.suppress_for_minutes * MINUTE_MS for r in self.enabled_rules
                    },
                    alert_retention_ms=int(cfg.scheduler.alert_retention * 1000),
                    deadletter_retention_ms=int(cfg.scheduler.alert_retention * 1000),
                    sinks=[s.name for s in cfg.sinks],
                ),
            ),
        )
        # A writer or scheduler that cannot come back needs a new process (/healthz fails).
        self.supervisor.spawn("writer", self.writer.run, restart_cures=False)
        self.dispatcher = Dispatcher(cfg.sinks, self.alerts, self.clock, self.metrics)
        self.dispatcher.start()
        alerts = self.alerts
        self.runner = TickRunner(
            self.firstseen,
            alerts,
            cfg.sinks,
            self.clock,
            self.metrics,
            outbox_depth=alerts.depth,
            on_commit=self.dispatcher.notify,
            max_alerts_per_tick=cfg.limits.max_alerts_per_tick,
            gates=AlertGates(
                alerts, self.firstseen.entity_first_seen, self.first_start_ms, self.metrics
            ),
            explainer=Explainer(self.firstseen.context, self.firstseen.entity_first_seen),
            ledger=self.firstseen,
            watermarks=watermarks,
            next_tick=next_tick,
        )
        grpc_cfg = cfg.receiver.grpc
        # One decoder for both transports: thread-safe, and its resource cache is shared.
        decoder = Decoder(
            self.rules,
            cfg.receiver.max_key_field_bytes,
            cfg.receiver.resource_cache,
            durable=self.durable,
            owns_cluster=owns_cluster(cfg.shard.clusters),
        )
        self.metrics.shard_info.labels(
            shard=cfg.shard.name, clusters=",".join(cfg.shard.clusters)
        ).set(1)
        self.metrics.build_info.labels(
            version=__version__, fast_path="c" if ACCELERATED else "python"
        ).set(1)
        cache.labels(cache="resources").set_function(lambda: decoder.cached_resources)
        if grpc_cfg.processes > 1:  # decoded in worker processes, written here
            self.receiver = GrpcWorkers(
                cfg, self.writer, self.durable, self.metrics, self.supervisor
            )
        else:
            self.receiver = OtlpGrpcReceiver(
                grpc_cfg,
                decoder,
                self.writer,
                self.time_bounds,
                self.metrics,
                token=bearer_token(grpc_cfg.auth, "receiver.grpc"),
                tls=tls_of(grpc_cfg.tls, "receiver.grpc"),
            )
        self.receiver.start()
        http_cfg = cfg.receiver.http
        if http_cfg.listen:
            self.http_receiver = OtlpHttpReceiver(
                http_cfg,
                decoder,
                self.writer,
                self.time_bounds,
                self.metrics,
                token=bearer_token(http_cfg.auth, "receiver.http"),
                tls=tls_of(http_cfg.tls, "receiver.http"),
            )
            self.http_receiver.start()
        self.scheduler = Scheduler(
            self.rules,
            self.runner,
            alerts,
            self.clock,
            self.metrics,
            self.first_start_ms,
            cfg.scheduler.catch_up_max_ticks,
            cfg.scheduler.alert_retention,
        )
        self.supervisor.spawn("scheduler", self.scheduler.run, restart_cures=False)
        self.supervisor.spawn("stream", self.stream.run)
        if serve_http:
            from pathwatch.app.http import AdminHttpServer

            http = cfg.http
            server = AdminHttpServer(
                self,
                http.listen,
                token=bearer_token(http.auth, "http"),
                tls=tls_of(http.tls, "http"),
                protect_probes=http.protect_probes,
            )
            self.supervisor.spawn("admin", server.run)
            self.http = server
        log.info(
            "pathwatch started",
            data_dir=cfg.data_dir,
            rules=[r.id for r in self.enabled_rules],
            sinks=[s.name for s in cfg.sinks],
            seconds=round(time.monotonic() - started, 3),
        )

    def _on_key_limit(self, hits: tuple[LimitHit, ...]) -> None:
        """Writer thread: one summary alert per host (or fleet) and hour past a new-key cap."""
        rules = {r.id: r for r in self.rules}
        if self.runner is not None:
            self.runner.publish(
                [
                    key_limit_event(rules[h.rule_id], h.host, h.hour_ms, h.limit, h.sender)
                    for h in hits
                ]
            )

    def _on_stream(self, hits: tuple[StreamHit, ...]) -> None:
        if self.runner is not None:
            self.runner.stream({r.id: r for r in self.rules}, hits)

    def _baseline_complete(self, rule: Rule) -> float:
        return 1.0 if self.baseline_status(rule)["complete"] else 0.0

    def baseline_status(self, rule: Rule) -> dict[str, object]:
        """When the rule's warm-up ends and its baseline spans its full length."""
        from pathwatch.alerts.event import rfc3339

        warm_until = self.first_start_ms + rule.warmup_minutes * MINUTE_MS
        full_at = self.first_start_ms + rule.baseline_minutes * MINUTE_MS
        now = self.clock.now_ms()
        complete = now >= max(warm_until, full_at)
        return {
            "first_start": rfc3339(self.first_start_ms),
            "warmup_until": rfc3339(warm_until),
            "baseline_full_at": rfc3339(full_at),
            "complete": complete,
            "learning_period": f"{rule.learning_period_minutes}m",
        }

    def readiness(self) -> Readiness:
        checks: dict[str, str] = {}
        ok = True
        if self.db is None or self.writer is None:
            checks["store"], ok = "not open", False
        elif not self.writer.healthy:
            checks["store"], ok = f"writes failing: {self.writer.last_error}", False
        else:
            checks["store"] = "ok"
        if self.receiver is None or not self.receiver.serving:
            checks["receiver"], ok = "not serving", False
        elif isinstance(self.receiver, GrpcWorkers):
            serving, count = self.receiver.serving_count, self.receiver.count
            checks["receiver"] = (
                "ok" if serving == count else f"{serving} of {count} worker processes serving"
            )
        else:
            checks["receiver"] = "ok"
        if self.config.receiver.http.listen:
            if self.http_receiver is None or not self.http_receiver.serving:
                checks["receiver_http"], ok = "not serving", False
            else:
                checks["receiver_http"] = "ok"
        if self.scheduler is None or not self.scheduler.running:
            checks["scheduler"], ok = "not running", False
        else:
            checks["scheduler"] = self.scheduler.last_error or "ok"
        failed = self.supervisor.failed()
        if failed:
            checks["components"], ok = (
                f"given up after repeated failures: {', '.join(failed)}",
                False,
            )
        for status in self.dispatcher.statuses() if self.dispatcher else []:
            checks[f"sink:{status.name}"] = (
                f"disabled: {status.disabled}" if status.disabled else "ok"
            )
        return Readiness(ok, checks)

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop everything within roughly `timeout` seconds."""
        deadline = time.monotonic() + timeout

        def left(share: float) -> float:
            return max(0.5, (deadline - time.monotonic()) * share)

        if self.http is not None:
            self.http.shutdown()  # type: ignore[attr-defined]
            self.http = None
        if self.http_receiver is not None:
            self.http_receiver.shutdown(grace=left(0.2))
        if self.receiver is not None:
            self.receiver.shutdown(grace=left(0.4))
        if self.scheduler is not None:
            self.scheduler.shutdown(left(0.3))
        if self.writer is not None:
            self.writer.shutdown(left(0.5))
        self.stream.drain(left(0.3))
        self.supervisor.stop(left(0.3))
        if self.dispatcher is not None:
            self.dispatcher.shutdown(left(0.8))
        if self.db is not None:
            self.db.close()
        log.info("pathwatch stopped")
