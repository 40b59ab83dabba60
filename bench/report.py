"""The final report: the machine, the exact workload and one table of results against targets."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from bench import procstat
from bench.history import HistoryResult, median_server_s
from bench.ingest import IngestResult
from bench.otlp import POINTS_PER_RESOURCE, PROCESS_METRICS
from bench.settings import Settings, replica_channels, replica_concurrency

MB = 1_000_000
_PACKAGES = ("pathwatch", "grpcio", "protobuf", "opentelemetry-proto", "rocksdict", "duckdb")


@dataclass(frozen=True)
class Machine:
    cores: int
    cpu_model: str
    memory_bytes: int
    system: str
    python: str
    versions: dict[str, str]

    @classmethod
    def detect(cls) -> Machine:
        versions = {}
        for name in _PACKAGES:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = "absent"
        return cls(
            cores=os.cpu_count() or 0,
            cpu_model=procstat.cpu_model(),
            memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            system=f"{platform.system()} {platform.release()}",
            python=platform.python_version(),
            versions=versions,
        )


@dataclass(frozen=True)
class Row:
    measurement: str
    result: str
    target: str = ""
    verdict: str = ""


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _n(value: float) -> str:
    return f"{round(value):,}"


def _mb(value: float) -> str:
    return f"{value / MB:,.0f} MB"


def _s(value: float) -> str:
    return f"{value:.3f} s"


def _receive_rows(receive: dict[str, Any] | None, per_cpu: float, parse: float) -> list[Row]:
    """The receive-only baseline (bench.receive): what gRPC alone costs per resource."""
    if receive is None:
        return []
    floor = receive["resources_per_s"] / max(receive["service_cpu"], 1e-9)
    return [
        Row("   receive-only: per CPU-second of a gRPC server acknowledging without decoding",
            f"{_n(floor)} ({_n(receive['resources_per_s'])}/s at "
            f"{receive['service_cpu']:.2f} cores)"),
        Row("   receive-only / parse-only: the most the ratio above can reach with grpcio",
            f"{floor / parse:.1%}"),
        Row("   ingest / receive-only, per service CPU-second", f"{per_cpu / floor:.1%}"),
    ]  # fmt: skip


def rows(
    settings: Settings,
    ingest: IngestResult,
    history: HistoryResult,
    reference: dict[str, Any] | None,
    second: IngestResult | None = None,
    replica: IngestResult | None = None,
) -> list[Row]:
    fleet, parse, plan = ingest.fleet, ingest.parse, history.plan
    ratio = fleet["resources_per_s"] / parse["resources_per_s"]
    # When the generator cannot keep the service's core busy, the resources acknowledged per
    # CPU-second the service used are what one busy core would acknowledge.
    per_cpu = fleet["resources_per_s"] / max(fleet["service_cpu"], 1e-9)
    cpu_ratio = per_cpu / parse["resources_per_s"]
    out = [
        Row(f"1. ingest at a {ingest.spec.interval_s:g} s interval: resources/s acknowledged "
            "(service on 1 core)",
            _n(fleet["resources_per_s"]), ">= 50% of parse-only"),
        Row("   same, per CPU-second the service used (one busy core)", _n(per_cpu)),
        Row("   parse-only: resources/s, ExportMetricsServiceRequest.FromString, 1 core",
            _n(parse["resources_per_s"])),
        Row("   ingest / parse-only: measured, per service CPU-second",
            f"{ratio:.1%} / {cpu_ratio:.1%}", ">= 50%", _verdict(cpu_ratio >= 0.5)),
        *_receive_rows(ingest.receive, per_cpu, parse["resources_per_s"]),
        Row("   data points/s acknowledged", _n(fleet["points_per_s"])),
        Row(f"   Export latency p50 / p99 ({settings.concurrency} in flight)",
            f"{fleet['latency_p50_ms']:.0f} / {fleet['latency_p99_ms']:.0f} ms"),
        Row("   CPU used: service / load generator (cores)",
            f"{fleet['service_cpu']:.2f} / {fleet['loadgen_cpu']:.2f}",
            "service ~1.00, generator < 0.90",
            _verdict(fleet["loadgen_cpu"] < 0.9 and fleet["service_cpu"] > 0.9)),
    ]  # fmt: skip
    if second is not None:
        f2 = second.fleet
        per_cpu2 = f2["resources_per_s"] / max(f2["service_cpu"], 1e-9)
        out += [
            Row(f"   at a {second.spec.interval_s:g} s interval: resources/s, per service "
                "CPU-second", f"{_n(f2['resources_per_s'])}, {_n(per_cpu2)}"),
            Row("   same / parse-only: measured, per service CPU-second",
                f"{f2['resources_per_s'] / parse['resources_per_s']:.1%} / "
                f"{per_cpu2 / parse['resources_per_s']:.1%}"),
        ]  # fmt: skip
    out += _replica_rows(settings, fleet, per_cpu, replica)
    load = history.loads
    seconds = sum(x["seconds"] for x in load)
    keys = sum(x["keys"] for x in load)
    rss = " / ".join(_mb(history.rss_at.get(p, 0)) for p in (10, 50, 100))
    out += [
        Row(f"2. memory: peak RSS (VmHWM) while storing {_n(plan.keys)} keys",
            _mb(history.hwm_after_load), "< 300 MB",
            _verdict(history.hwm_after_load < 300 * MB)),
        Row("   RSS at 10% / 50% / 100% of the keys", rss, "flat: +5% at most 50->100%",
            _verdict(history.rss_at.get(100, 0) <= 1.05 * history.rss_at.get(50, 0))),
        Row("   peak RSS including every evaluation", _mb(history.hwm_end)),
        Row("   at 100%: RocksDB block cache / memtables / table readers",
            " / ".join(_mb(int(history.memory_parts.get(p, 0)))
                       for p in ("block_cache", "memtables", "table_readers"))),
        Row("   at 100%: entries in the key / resource / durable-resource caches",
            " / ".join(_n(history.memory_parts.get(f"{c}_entries", 0))
                       for c in ("keys", "resources", "durable"))),
        Row("   history ingest: new keys/s (mostly new keys, 1 core)", _n(keys / seconds)),
    ]  # fmt: skip
    first = {stage: evs[0] for stage, evs in history.evaluations.items()}
    short, full = first[0], first[1]
    out += [
        Row(f"3. evaluation, {plan.spec.days} d of history ({_n(plan.keys)} keys, "
            f"{_n(plan.active_keys)} active)", _s(full.server_s), "< 1 s",
            _verdict(full.server_s < 1.0)),
        Row(f"   same, {plan.spec.short_days} d of history ({_n(plan.stage_keys(0))} keys)",
            _s(short.server_s), "flat", _verdict(full.server_s <= 1.5 * short.server_s + 0.05)),
        Row("   repeated at other minutes (alerts already recorded), median 7 d / 30 d",
            f"{_s(median_server_s(history.evaluations[0][1:] or history.evaluations[0]))} / "
            f"{_s(median_server_s(history.evaluations[1][1:] or history.evaluations[1]))}"),
        Row("   stage 2 backfill: new minutes before the latest tick (counted late)",
            _n(history.late_listed.get(1, 0)), "listed only within window + 3 days"),
        Row("   evaluate HTTP round trip, 30 d (response size)",
            f"{_s(full.http_s)} ({full.response_bytes / 1000:,.0f} kB)"),
        Row("   offline `pathwatch evaluate` (process start to exit)", _s(history.cli_s)),
        Row("   first evaluation after a restart (cold caches)",
            _s(history.restart_eval.server_s) if history.restart_eval else "-"),
    ]  # fmt: skip
    if reference is not None:
        by_stage = {s["stage"]: s for s in reference["stages"]}
        d0, d1 = by_stage[0]["query_median_s"], by_stage[1]["query_median_s"]
        r0, r1 = d0 / max(short.server_s, 1e-9), d1 / max(full.server_s, 1e-9)
        out += [
            Row(f"   DuckDB reference, {plan.spec.short_days} d / {plan.spec.days} d of rows "
                f"({_n(by_stage[0]['rows'])} / {_n(by_stage[1]['rows'])})",
                f"{_s(d0)} / {_s(d1)}", f"DuckDB peak RSS {_mb(reference['peak_rss'])}"),
            Row(f"   DuckDB / pathwatch at {plan.spec.short_days} d / {plan.spec.days} d",
                f"{r0:.1f}x / {r1:.1f}x", ">= 10x", _verdict(r1 >= 10)),
        ]  # fmt: skip
    lat = history.export_latency
    if lat is not None:
        every = f"{settings.probe_period_s * 1000:.0f} ms"
        out += [
            Row(f"   Export round trip, idle: p50 / p99 / max (count); one {lat.resources}-"
                f"process scrape every {every}, 1 in flight", lat.idle.text()),
            Row(f"   same, during evaluations of {plan.spec.days} d of history (the Exports "
                "overlapping one)", lat.busy.text(),
                f"{lat.evaluations} back-to-back dry runs, median {_s(lat.evaluation_median_s)}"),
            Row("   note: stream mode on, the evaluations covered / stream alerts raised",
                f"{lat.busy_share:.0%} / {_n(lat.stream_alerts)}",
                "an ack waits for no evaluation"),
        ]  # fmt: skip
    out += [
        Row(f"4. restart: exec to /readyz 200 with {_n(history.keys_created)} keys",
            _s(history.restart_s), "< 5 s", _verdict(history.restart_s < 5.0)),
        Row("   clean shutdown (SIGTERM to exit)", _s(history.shutdown_s)),
        Row("5. disk: bytes per stored key after compaction",
            f"{history.bytes_after_compaction / max(1, plan.keys):.1f} B",
            f"{_mb(history.bytes_after_compaction)} total"),
        Row("   before compaction", f"{history.bytes_before_compaction / max(1, plan.keys):.1f} B",
            f"compaction took {history.compaction_s:.1f} s"),
    ]  # fmt: skip
    out.append(
        Row("checks: stored keys, alerts = expected = DuckDB, no rejects", *_checks(
            ingest, history, reference))
    )  # fmt: skip
    return out


def _checks(
    ingest: IngestResult, history: HistoryResult, reference: dict[str, Any] | None
) -> tuple[str, str, str]:
    plan, problems = history.plan, []
    for name, load in [("ingest", ingest.fleet), *(("history", x) for x in history.loads)]:
        if load["partial"]:
            problems.append(f"{name}: {load['partial']} exports had rejected points")
        if load["retries"]:
            problems.append(f"{name}: {load['retries']} exports retried (UNAVAILABLE)")
    lat = history.export_latency
    if lat is not None and (lat.partial or lat.retries):
        problems.append(f"latency probe: {lat.partial} rejected, {lat.retries} retried")
    if history.keys_created != plan.keys:
        problems.append(f"stored {history.keys_created:,} keys, sent {plan.keys:,}")
    for stage, evs in history.evaluations.items():
        found = evs[0].alerts + evs[0].duplicates
        if found != plan.expected_new(stage):
            problems.append(f"stage {stage}: {found} found, {plan.expected_new(stage)} expected")
    for s in (reference or {}).get("stages", []):
        if s["found"] != s["expected"]:
            problems.append(f"DuckDB stage {s['stage']}: {s['found']} found")
    if problems:
        return "; ".join(problems), "", "FAIL"
    return "all match", "", "PASS"


def render_table(table: list[Row]) -> str:
    header = Row("measurement", "result", "target", "")
    widths = [
        max(len(getattr(r, f)) for r in [header, *table])
        for f in ("measurement", "result", "target", "verdict")
    ]

    def line(r: Row) -> str:
        cells = (r.measurement, r.result, r.target, r.verdict)
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "-" * (sum(widths) + 6)
    return "\n".join([line(header), rule, *(line(r) for r in table)])


def describe_machine(machine: Machine, settings: Settings) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine.versions.items())
    return (
        f"machine:  {machine.cores} cores, {machine.cpu_model}, "
        f"{machine.memory_bytes / 2**30:.1f} GiB RAM, {machine.system}, Python {machine.python}\n"
        f"          {versions}\n"
        f"pinning:  service on core {settings.service_cpu} (taskset), load generator, DuckDB "
        f"and py-spy on core {settings.loadgen_cpu}; parse-only baseline and DuckDB queries "
        f"on core {settings.service_cpu} while the service is stopped"
    )


def _replica_rows(
    settings: Settings, fleet: dict[str, Any], per_cpu: float, replica: IngestResult | None
) -> list[Row]:
    """Per replica: the service with worker processes on every core, the load generator on
    the same cores. With a core of its own for the load generator (3 cores or more), the
    acknowledged rate is the figure; on 2 cores the generator takes part of them, so the
    figure is projected: the replica's rate per CPU-second over the 1-process rate per
    CPU-second (its efficiency), times the cores given. Both per CPU-second: the 1-process
    run's own rate is the generator's limit when that cannot keep its core busy."""
    if replica is None:
        return [Row("   per replica: receiver.grpc.processes > 1", "not run (--replica-processes)",
                    ">= 1.8x the 1-core figure")]  # fmt: skip
    r = replica.fleet
    processes = settings.replica_processes
    per_cpu_r = r["resources_per_s"] / max(r["service_cpu"], 1e-9)
    cores = len(procstat.ALL_CORES)
    efficiency = per_cpu_r / max(per_cpu, 1e-9)
    projected = efficiency * cores
    measured = r["resources_per_s"] / max(fleet["resources_per_s"], 1e-9)
    own_core = cores >= 3
    return [
        Row(f"   per replica: {processes} receiver processes, {cores} cores shared with the load "
            "generator: resources/s, service CPU (cores, all processes)",
            f"{_n(r['resources_per_s'])}, {r['service_cpu']:.2f} (generator "
            f"{r['loadgen_cpu']:.2f})"),
        Row("   same, per service CPU-second / the 1-process figure (efficiency)",
            f"{_n(per_cpu_r)} / {efficiency:.0%}"),
        Row(f"   per replica / 1 core: measured; projected for {cores} cores given to the "
            "service (efficiency x cores)", f"{measured:.2f}x; {projected:.2f}x",
            ">= 1.8x the 1-core figure",
            _verdict(measured >= 1.8) if own_core else f"{_verdict(projected >= 1.8)} (projected)"),
        Row("   Export latency p50 / p99; RSS of all processes",
            f"{r['latency_p50_ms']:.0f} / {r['latency_p99_ms']:.0f} ms; "
            f"{_mb(replica.service_rss)}"),
    ]  # fmt: skip


def describe_workload(
    settings: Settings,
    ingest: IngestResult,
    history: HistoryResult,
    second: IngestResult | None = None,
    replica: IngestResult | None = None,
) -> str:
    plan, spec = history.plan, ingest.spec
    names = ", ".join(m.name.removeprefix("process.") for m in PROCESS_METRICS)
    return "\n".join(
        [
            f"requests: hostmetrics-shaped ExportMetricsServiceRequest, {settings.processes} "
            f"process resources each, 10 resource attributes (pid, parent pid, executable name "
            f"and path, command, command line, owner, host.name, k8s.cluster.name, "
            f"k8s.node.name), {len(PROCESS_METRICS)} metrics / {POINTS_PER_RESOURCE} data "
            f"points per resource ({names}); {ingest.request_bytes / 1000:,.0f} kB per request "
            f"({ingest.request_gzip_bytes / 1000:,.0f} kB gzip); gzip on the wire",
            f"ingest:   {spec.nodes} nodes x {spec.processes} processes "
            f"({spec.nodes * spec.processes:,} live keys), a scrape every {spec.interval_s:g} s "
            f"of simulated time per node starting {ingest.head_start_s / 3600:.1f} h "
            f"before the run, churn {spec.churn:.1%} of processes per scrape; "
            f"{settings.concurrency} Exports in flight over {settings.channels} connections; "
            f"every node's first scrape, then {settings.warmup_s:g} s warm-up, then "
            f"{ingest.fleet['seconds']:.1f} s measured: {ingest.fleet['simulated_minutes']} "
            f"whole simulated minute(s) of the fleet (at least {settings.duration_s:g} s)"
            + (
                f"; again at a {second.spec.interval_s:g} s interval: "
                f"{second.fleet['seconds']:.1f} s measured"
                if second is not None
                else ""
            )
            + (
                f"; per replica: receiver.grpc.processes {settings.replica_processes}, the "
                f"service and the load generator sharing every core, "
                f"{replica_concurrency(settings)} Exports in flight over "
                f"{replica_channels(settings)} connections, "
                f"{replica.fleet['seconds']:.1f} s measured"
                if replica is not None
                else ""
            ),
            f"history:  {plan.keys:,} distinct keys over {plan.spec.days} days, {plan.spec.nodes}"
            f" nodes; {plan.active_keys:,} active in the last hour, {plan.expected_new(1):,} of "
            f"them new (no earlier observation); stage 1: active keys + newest "
            f"{plan.spec.short_days} days ({plan.stage_keys(0):,} keys), stage 2: the older "
            f"history ({plan.stage_keys(1):,} keys); evaluations at ticks just before "
            f"{_iso(plan.tick_ms)}, each at its own minute",
            f"latency:  after the restart (rule in stream mode) and its first keyspace sweep, "
            f"one node of the ingest fleet "
            f"({settings.processes} processes, churn {settings.churn:.1%}, so a new process "
            f"and a stream alert per scrape) sends a scrape every "
            f"{settings.probe_period_s * 1000:.0f} ms from core {settings.loadgen_cpu}, 1 in "
            f"flight, {settings.probe_s:g} s with the service idle, then {settings.probe_s:g} s "
            f"while the bench POSTs evaluate?dry_run=true at one minute back to back (the full "
            f"evaluation under the runner's lock, nothing recorded); its timestamps are current, "
            f"after every evaluated window",
            f"service:  store.fsync {str(settings.fsync).lower()}, other settings default "
            f"({service_defaults()}); the rule's schedule moved off the run (the bench "
            f"evaluates through the API) and its delay 0s (the API refuses a tick before its "
            f"window plus the delay has passed); receiver.max_baseline_lateness 0s (history "
            f"replayed over OTLP counts as baseline); limits.new_keys_per_sender_per_hour 0 "
            f"(the load generator is one sender for the whole fleet); history phase with the "
            f"new-key flood guards off (limits.new_keys_per_*: 0)",
        ]
    )


def service_defaults() -> str:
    """The service's bounded caches and workers, read from its own configuration defaults."""
    from pathwatch.config.model import GrpcReceiverConfig, ReceiverConfig, StoreConfig
    from pathwatch.receiver.decode import ACCELERATED
    from pathwatch.store.db import DatabaseOptions

    store, receiver = StoreConfig(), ReceiverConfig()
    parts = [f"store.cache_keys {store.cache_keys:,}"]
    resources = getattr(receiver, "resource_cache", None)
    if resources is not None:
        parts.append(f"receiver.resource_cache {resources:,}")
    durable = getattr(receiver, "durable_resources", None)
    if durable is not None:
        parts.append(f"receiver.durable_resources {durable:,}")
    parts += [
        f"store.max_pending_keys {store.max_pending_keys:,}",
        f"store.block_cache_size {store.block_cache_size >> 20} MiB",
        f"write buffer {DatabaseOptions().write_buffer_bytes >> 20} MiB",
        f"{GrpcReceiverConfig().max_workers} gRPC workers",
        "receiver fast path: "
        + ("C accelerator (_wirescan.c)" if ACCELERATED else "pure Python (no C accelerator)"),
    ]
    return ", ".join(parts)


def describe_profile(title: str, top: list[tuple[str, float]]) -> str:
    if not top:
        return ""
    lines = [f"py-spy, {title}: top functions by self time (share of samples)"]
    lines += [f"  {share:6.1%}  {name}" for name, share in top]
    return "\n".join(lines)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
