"""The configuration schema: frozen dataclasses whose defaults are the embedded defaults.

Field names are the YAML keys. `Duration` fields take "90s", "5m", "1h", "30d", "1h30m" or a
number of seconds; `ByteSize` fields take an integer or "64MiB", "512KiB", "1GiB".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType

Duration = NewType("Duration", float)
ByteSize = NewType("ByteSize", int)


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS; with client_ca_file, clients must present a certificate it signed (mTLS).
    The files are re-read when they change."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    # With client_ca_file (mTLS): refuse a resource whose host.name matches no DNS SAN (nor the
    # CN) of the client certificate, so a compromised node cannot write other nodes' history.
    require_host_match: bool = False


@dataclass(frozen=True)
class AuthConfig:
    """A bearer token clients must send (Authorization: Bearer ...); none means open."""

    bearer_token: str | None = None
    bearer_token_file: str | None = None
    bearer_token_env: str | None = None


@dataclass(frozen=True)
class GrpcReceiverConfig:
    listen: str = "0.0.0.0:4317"
    max_receive_message_size: ByteSize = ByteSize(64 << 20)
    max_workers: int = 8
    # Processes that serve this endpoint (decode on their own cores; the service process
    # keeps the store and writes). 1: the service process serves it itself.
    processes: int = 1
    # How long an Export waits for its observations to become durable before answering
    # UNAVAILABLE (the collector then retries; presence is idempotent, so a retry is harmless).
    ack_timeout: Duration = Duration(10.0)
    # Streams one client connection may hold open at once (the collector runs up to 10
    # concurrent exports); past it the client queues, so half-open streams of one connection
    # cannot take every worker.
    max_concurrent_streams: int = 16
    # Clients that ping more often than this are disconnected (keepalive enforcement).
    keepalive_min_time: Duration = Duration(10.0)
    # Connections are closed after this age (plus a grace period for RPCs in flight), so that
    # no connection is held forever; the collector reconnects at once.
    max_connection_age: Duration = Duration(600.0)
    max_connection_idle: Duration = Duration(300.0)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)


@dataclass(frozen=True)
class HttpReceiverConfig:
    """OTLP/HTTP: POST /v1/metrics, binary protobuf or JSON, gzip. An empty listen turns it off."""

    listen: str = "0.0.0.0:4318"
    # Applies to the body as sent and again after decompression (413 past it).
    max_receive_message_size: ByteSize = ByteSize(64 << 20)
    # How long an export waits for a durable write before answering 503 + Retry-After.
    ack_timeout: Duration = Duration(10.0)
    # Connections served at once (a thread each); past it, 503 + Retry-After.
    max_concurrent_requests: int = 32
    # OTLP/JSON costs ~10x its size in memory to decode: its own decompressed-size limit (413
    # past it) and a bound on JSON bodies decoded at once (503 + Retry-After past it).
    max_json_message_size: ByteSize = ByteSize(8 << 20)
    max_concurrent_json_decodes: int = 2
    # A request must send its headers and body within this (slow senders are cut off, 408).
    read_timeout: Duration = Duration(10.0)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)


@dataclass(frozen=True)
class ReceiverConfig:
    grpc: GrpcReceiverConfig = field(default_factory=GrpcReceiverConfig)
    http: HttpReceiverConfig = field(default_factory=HttpReceiverConfig)
    max_future_skew: Duration = Duration(300.0)
    # A point arriving later than this after its timestamp is stored and can make a key new,
    # but never counts as baseline (it cannot hide a key). 0s trusts every timestamp, as the
    # reference search does: use it only to replay history over OTLP.
    max_baseline_lateness: Duration = Duration(3600.0)
    max_key_field_bytes: int = 4096
    # Distinct resources whose decoded key fields are remembered (a process's resource
    # attributes repeat every scrape). Bounded memory; a miss re-decodes the resource.
    resource_cache: int = 20_000
    # Resources known durable in their latest minute (about 100 bytes each): a scrape whose
    # resources are all known for its minute is acknowledged without decoding or writing.
    # Size it above the fleet's live processes; a forgotten one costs one full decode.
    durable_resources: int = 300_000


@dataclass(frozen=True)
class HttpConfig:
    # Loopback by default: the API lists every alert and the process inventory. The chart
    # binds 0.0.0.0 behind its NetworkPolicy and a bearer token.
    listen: str = "127.0.0.1:8080"
    # Socket timeout per request (headers, body, and writing the response).
    read_timeout: Duration = Duration(10.0)
    # Requests served at once (a thread each); past it, 503 + Retry-After.
    max_concurrent_requests: int = 16
    tls: TlsConfig = field(default_factory=TlsConfig)
    # The token guards /api/; /healthz, /readyz and /metrics stay open for probes and
    # Prometheus unless protect_probes is true.
    auth: AuthConfig = field(default_factory=AuthConfig)
    protect_probes: bool = False


@dataclass(frozen=True)
class StoreConfig:
    # fsync the WAL on every group commit: an acknowledged export then survives a power loss,
    # not only a process crash. Turn off only where losing the last second of data is fine.
    fsync: bool = True
    cache_keys: int = 20_000
    max_pending_keys: int = 20_000
    max_runs_per_key: int = 256
    block_cache_size: ByteSize = ByteSize(32 << 20)
    expiry_interval: Duration = Duration(3600.0)
    # A running process's minute right after a stored one is logged (one entry per group
    # commit) and folded into its key record this often: one record write per key per
    # interval instead of per minute. 0 writes every minute into the records at once.
    fold_interval: Duration = Duration(600.0)


@dataclass(frozen=True)
class SchedulerConfig:
    # Ticks missed while pathwatch was down are run on restart, newest first up to this many
    # per rule; older ones are skipped and counted.
    catch_up_max_ticks: int = 24
    # Alerts and tick records older than this are removed from the alert log; deliveries still
    # pending stay until delivered, dead letters are removed once enqueued longer ago than this
    # (redrive them before), and so are the outboxes of sinks no longer configured.
    alert_retention: Duration = Duration(30 * 86400.0)


@dataclass(frozen=True)
class LimitsConfig:
    """Flood guards (0 disables one). Past a new-key cap, data is accepted but the new keys
    are not tracked and one summary alert per host and hour says so; past max_alerts_per_tick,
    the remaining alerts of that tick are recorded and summarised in one alert."""

    # Every new-key budget is charged to the sender (the client address, or its certificate
    # identity under mTLS): one sender cannot exhaust the budget of a host or of the fleet for
    # the others. A refused key is still listed in the cap's summary alert.
    new_keys_per_host_per_hour: int = 10_000  # per (sender, host)
    new_keys_per_sender_per_hour: int = 100_000  # per sender, over all its hosts
    new_keys_per_hour: int = 1_000_000  # whole fleet
    max_alerts_per_tick: int = 1_000


@dataclass(frozen=True)
class ShardConfig:
    """One pathwatch of several, each owning whole clusters (k8s.cluster.name). `clusters`
    holds names or shell-style globs; empty owns every cluster (a single replica). A resource
    of a cluster the shard does not own is refused through partial_success, never stored.
    `name` labels the shard's metrics (pathwatch_shard_info) and logs."""

    name: str = ""
    clusters: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # json, console, or auto (console on a terminal, JSON otherwise)


@dataclass(frozen=True)
class ExclusionConfig:
    field: str = ""
    value: str | None = None
    glob: str | None = None
    regex: str | None = None


@dataclass(frozen=True)
class RuleConfig:
    """A rule entry. For a built-in `id`, only the fields given override the built-in's."""

    id: str = ""
    name: str | None = None
    enabled: bool | None = None
    key_fields: list[str] | None = None
    metrics: list[str] | None = None
    window: Duration | None = None
    baseline: Duration | None = None
    schedule: str | None = None
    delay: Duration | None = None
    exclude: list[ExclusionConfig] | None = None
    mode: str | None = None
    # A cluster with no observation before the window (a fresh install, a cluster new to this
    # replica): "summarize" (default) raises one summary per cluster instead of one alert per
    # key; "alert" alerts every key, as the reference search does.
    no_baseline: str | None = None
    learning_period: Duration | None = None
    warmup: Duration | None = None
    suppress_for: Duration | None = None
    impact: int | None = None
    confidence: int | None = None
    risk_message: str | None = None
    risk_object_field: str | None = None
    search_name: str | None = None


@dataclass(frozen=True)
class RetryConfig:
    initial_backoff: Duration = Duration(1.0)
    max_backoff: Duration = Duration(300.0)
    max_age: Duration = Duration(86400.0)


@dataclass(frozen=True)
class SinkConfig:
    name: str = ""
    type: str = ""
    url: str = ""
    timeout: Duration = Duration(10.0)
    headers: dict[str, str] = field(default_factory=dict)
    retry: RetryConfig = field(default_factory=RetryConfig)
    max_concurrency: int = 4
    max_queue: int = 100_000
    min_risk_score: int = 0
    rules: list[str] = field(default_factory=list)
    # webhook (Standard Webhooks signing; every configured secret signs, for rotation)
    secret: str | None = None
    secret_file: str | None = None
    secret_env: str | None = None
    secrets: list[str] = field(default_factory=list)
    # TLS
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False
    # splunk_hec
    token: str | None = None
    token_file: str | None = None
    token_env: str | None = None
    index: str = "risk"
    sourcetype: str = "pathwatch:risk"
    batch_size: int = 50
    # alertmanager
    ends_after: Duration = Duration(86400.0)
    generator_url: str = ""
    severity: str = "warning"
    # cloudevents
    source: str = "pathwatch"


SINK_TYPES = ("webhook", "splunk_hec", "alertmanager", "cloudevents")


@dataclass(frozen=True)
class Config:
    data_dir: str = "./data"
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    rules: list[RuleConfig] = field(default_factory=list)
    sinks: list[SinkConfig] = field(default_factory=list)
