"""Phase 2: memory while the history is ingested, evaluation, restart and disk.

One service (one data dir) takes the HistoryPlan's two stages through gRPC while its RSS is
sampled every second. After each stage the built-in rule is evaluated through the API, each
time at a different minute (the API records every tick). Then: a clean stop, the offline
`pathwatch evaluate`, a timed restart to /readyz 200 with one more evaluation, Export latency
while idle and while the full history is evaluated (below), a stop, a full RocksDB compaction,
and the data dir's size per stored key.

Export latency: the restart turns the rule to stream mode (the history load would otherwise
raise a stream alert per stored key), so a new process in a scrape is alerted at once by the
service's stream publisher, which takes the lock an evaluation holds. A steady exporter (one
node of the fleet, a scrape every `probe_period_s`, one Export in flight, from the load
generator's core) runs `probe_s` with the service otherwise idle, then `probe_s` while the bench
evaluates the full history back to back through the API (dry runs at one unrecorded minute: the
same evaluation under the same lock as a recorded tick, without its commit, so it can repeat).
The busy figures count the Exports whose round trip overlapped an evaluation.
"""

from __future__ import annotations

import bisect
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat
from bench.children import Event, run_child
from bench.loadgen import percentile
from bench.otlp import MINUTE_MS
from bench.profile import Recording, record
from bench.progress import count, megabytes, say
from bench.service import RULE, ServiceUnderTest, child_env, metric_value
from bench.settings import Settings
from bench.workload import FleetSpec, HistoryPlan, HistorySpec

MILESTONES = (10, 50, 100)  # percent of the keys at which RSS is reported
_FIRST_SWEEP_S = 61.0  # the writer sweeps every keyspace 60 s after a start, then hourly


@dataclass(frozen=True)
class Evaluation:
    at: str
    http_s: float  # the POST, as the client sees it
    server_s: float  # pathwatch_evaluation_duration_seconds of this tick
    alerts: int  # risk events in the response (summary events excluded)
    duplicates: int  # findings gated as already alerted (pathwatch_alerts_gated_total)
    response_bytes: int


@dataclass(frozen=True)
class Latency:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ordered = sorted(seconds)
        return cls(
            count=len(ordered),
            p50_ms=percentile(ordered, 0.50) * 1000,
            p99_ms=percentile(ordered, 0.99) * 1000,
            max_ms=(ordered[-1] if ordered else 0.0) * 1000,
        )

    def text(self) -> str:
        return f"{self.p50_ms:.1f} / {self.p99_ms:.1f} / {self.max_ms:.1f} ms ({self.count:,})"


@dataclass(frozen=True)
class ExportLatency:
    """A steady exporter's round trips, idle and during evaluations of the full history."""

    idle: Latency
    busy: Latency  # the Exports whose round trip overlapped an evaluation
    outside: int  # Exports of the busy window that overlapped none (not in `busy`)
    evaluations: int  # evaluations run during the busy window
    evaluation_median_s: float  # their HTTP round trip
    evaluation_max_s: float
    busy_share: float  # share of the busy window during which an evaluation ran
    stream_alerts: int  # stream alerts the service raised during the phase
    resources: int  # process resources per Export
    retries: int
    partial: int


@dataclass
class HistoryResult:
    plan: HistoryPlan
    loads: list[Event] = field(default_factory=list)
    rss_at: dict[int, int] = field(default_factory=dict)
    peak_rss_sampled: int = 0  # largest 1 s sample while loading
    hwm_after_load: int = 0  # VmHWM after the last stage, before its evaluations
    hwm_end: int = 0  # VmHWM after every evaluation
    # At 100% of the keys: RocksDB memory by part (bytes) and cache entries, from /metrics
    memory_parts: dict[str, float] = field(default_factory=dict)
    evaluations: dict[int, list[Evaluation]] = field(default_factory=dict)
    keys_created: int = 0
    # Observations each stage listed as late for the next tick (new minutes before the latest
    # recorded tick: stage 2's backfill, after stage 1's evaluations)
    late_listed: dict[int, int] = field(default_factory=dict)
    shutdown_s: float = 0.0
    cli_s: float = 0.0
    cli_alerts: int = 0
    restart_s: float = 0.0
    restart_eval: Evaluation | None = None
    export_latency: ExportLatency | None = None
    bytes_before_compaction: int = 0
    bytes_after_compaction: int = 0
    compaction_s: float = 0.0
    profile: list[tuple[str, float]] = field(default_factory=list)
    evaluate_profile: list[tuple[str, float]] = field(default_factory=list)


def rfc3339(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


class Minutes:
    """Distinct evaluation minutes, counting back from the plan's tick (the API records ticks)."""

    def __init__(self, tick_ms: int) -> None:
        self._next = tick_ms

    def take(self) -> int:
        at = self._next
        self._next -= MINUTE_MS
        return at


def evaluate(service: ServiceUnderTest, minutes: Minutes) -> Evaluation:
    """One evaluation through the API at a minute not evaluated before."""
    for _ in range(5):
        at = minutes.take()
        before = service.metrics()
        started = time.perf_counter()
        status, body, size = service.evaluate(rfc3339(at))
        http_s = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"evaluate answered {status}: {body}")
        if not body.get("new", True):
            continue  # the scheduler had run this tick: take the next minute
        after = service.metrics()
        seconds = "pathwatch_evaluation_duration_seconds_sum"
        gated = "pathwatch_alerts_gated_total"
        alerts = body.get("alerts", [])
        return Evaluation(
            at=rfc3339(at),
            http_s=http_s,
            server_s=_delta(before, after, seconds, rule=RULE),
            alerts=sum(1 for a in alerts if "kind" not in a),
            duplicates=round(_delta(before, after, gated, rule=RULE, reason="duplicate")),
            response_bytes=size,
        )
    raise RuntimeError("no free minute to evaluate at")


def _delta(before: dict[str, float], after: dict[str, float], name: str, **labels: str) -> float:
    return metric_value(after, name, **labels) - metric_value(before, name, **labels)


def _late_listed(service: ServiceUnderTest) -> int:
    metrics = service.metrics()
    return round(metric_value(metrics, "pathwatch_late_observations_total", outcome="after_tick"))


def _memory_parts(metrics: dict[str, float]) -> dict[str, float]:
    parts = {
        part: metric_value(metrics, "pathwatch_store_memory_bytes", part=part)
        for part in ("block_cache", "memtables", "table_readers")
    }
    for cache in ("keys", "resources", "durable"):
        parts[f"{cache}_entries"] = metric_value(metrics, "pathwatch_cache_entries", cache=cache)
    return parts


def data_bytes(path: Path) -> int:
    """Bytes of every file in the data dir except RocksDB's own text logs (LOG, LOG.old.*)."""
    return sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.startswith("LOG")
    )


def run_history(settings: Settings, workdir: Path, config: dict[str, Any]) -> HistoryResult:
    plan = HistoryPlan(
        HistorySpec(
            keys=settings.keys,
            active=settings.active,
            new_fraction=settings.new_fraction,
            nodes=settings.nodes,
            processes=settings.processes,
            days=settings.days,
            short_days=settings.short_days,
            now_ms=int(time.time() * 1000),
        )
    )
    result = HistoryResult(plan)
    minutes = Minutes(plan.tick_ms)
    service = ServiceUnderTest(workdir, "history", settings.service_cpu, config)
    sampler: procstat.RssSampler | None = None
    recording: Recording | None = None
    try:
        say("history", f"starting the service (core {settings.service_cpu}), fresh data dir")
        service.start()
        sampler = procstat.RssSampler(service.pid).start()
        stored = 0
        for stage in (0, 1):
            if stage == 1 and settings.profile is not None:
                settings.profile.mkdir(parents=True, exist_ok=True)
                out = settings.profile / "history.txt"
                recording = record(service.pid, 10.0, out, settings.loadgen_cpu)
            late = _late_listed(service)
            result.loads.append(_load_stage(settings, service, plan, stage, stored, result))
            result.late_listed[stage] = _late_listed(service) - late
            if result.late_listed[stage]:
                say(
                    "history",
                    f"stage {stage + 1}/2: {count(result.late_listed[stage])} new minutes "
                    "before the latest recorded tick (counted late; listed for the next tick "
                    "only within the index's reach, window + 3 days)",
                )
            stored += plan.stage_keys(stage)
            if recording is not None:
                result.profile = recording.finish()
                recording = None
            if stage == 1:
                result.hwm_after_load = procstat.memory(service.pid).hwm
                result.rss_at[100] = procstat.memory(service.pid).rss
                result.memory_parts = _memory_parts(service.metrics())
            result.evaluations[stage] = _evaluate_stage(settings, service, plan, stage, minutes)
        if settings.profile is not None:
            result.evaluate_profile = _profile_evaluation(settings, service, minutes)
        sampler.stop()
        result.peak_rss_sampled = max((rss for _, rss in sampler.samples), default=0)
        result.hwm_end = procstat.memory(service.pid).hwm
        result.keys_created = round(
            metric_value(service.metrics(), "pathwatch_store_keys_created_total")
        )
        say("history", "stopping the service (SIGTERM)")
        result.shutdown_s = service.stop()
        _offline_evaluate(service, minutes, result)
        # Stream mode from here on (see the module's docstring); it changes ingest only.
        service.reconfigure(
            rules=[{**r, "mode": "stream"} if r.get("id") == RULE else r for r in config["rules"]]
        )
        say("restart", f"starting again on {count(result.keys_created)} stored keys (stream mode)")
        result.restart_s = service.start()
        ready_at = time.monotonic()
        say("restart", f"ready (/readyz 200) {result.restart_s:.2f} s after exec")
        result.restart_eval = evaluate(service, minutes)
        say("restart", f"evaluation right after the restart: {result.restart_eval.server_s:.3f} s")
        result.export_latency = _export_latency(settings, service, plan, minutes, ready_at)
        service.stop()
        result.bytes_before_compaction = data_bytes(service.data_dir)
        say("disk", f"compacting {megabytes(result.bytes_before_compaction)} of RocksDB files")
        result.compaction_s = _compact(service.data_dir)
        result.bytes_after_compaction = data_bytes(service.data_dir)
        say("disk", f"{megabytes(result.bytes_after_compaction)} after compaction")
    finally:
        if sampler is not None:
            sampler.stop()
        if recording is not None:
            recording.kill()
        try:
            service.stop()
        finally:
            service.kill()
    return result


def _load_stage(
    settings: Settings,
    service: ServiceUnderTest,
    plan: HistoryPlan,
    stage: int,
    stored: int,
    result: HistoryResult,
) -> Event:
    """Send one stage through the load generator, recording RSS at the key milestones."""
    total = plan.keys
    say(
        "history",
        f"stage {stage + 1}/2: {count(plan.stage_keys(stage))} keys "
        f"({plan.stage_days(stage)} days of history in the store when done)",
    )

    def on_event(event: Event) -> None:
        keys = stored + event["keys"]
        for pct in MILESTONES:
            if pct not in result.rss_at and pct < 100 and keys * 100 >= pct * total:
                result.rss_at[pct] = procstat.memory(service.pid).rss
        rss = procstat.memory(service.pid).rss
        say(
            "history",
            f"stage {stage + 1}/2 {event['elapsed']:6.0f} s  {count(keys)}/{count(total)} keys "
            f"({100 * keys / total:3.0f}%)  {count(event['rate'])} resources/s  "
            f"RSS {megabytes(rss)}",
        )

    job = {
        "target": f"127.0.0.1:{service.grpc_port}",
        "source": "history",
        "spec": plan.spec.to_json(),
        "stage": stage,
        "concurrency": settings.concurrency,
        "channels": settings.channels,
        "service_pid": service.pid,
        "progress_s": 5.0 if plan.keys > 1_000_000 else 1.0,
    }
    # A slow service may take long (even 500 keys/s finishes), a stalled one fails in 5 minutes.
    timeout = 600 + plan.stage_keys(stage) / 500
    return run_child(
        "bench.loadgen", job, settings.loadgen_cpu, timeout, on_event, idle_timeout=300
    )


def _evaluate_stage(
    settings: Settings,
    service: ServiceUnderTest,
    plan: HistoryPlan,
    stage: int,
    minutes: Minutes,
) -> list[Evaluation]:
    out = []
    for i in range(max(1, settings.evaluations)):
        ev = evaluate(service, minutes)
        out.append(ev)
        say(
            "evaluate",
            f"{plan.stage_days(stage)} d of history, run {i + 1}: {ev.server_s:.3f} s in the "
            f"service, {ev.http_s:.3f} s HTTP, {ev.alerts} alerts, {ev.duplicates} already "
            f"alerted (expected new keys: {plan.expected_new(stage)})",
        )
    return out


def _profile_evaluation(
    settings: Settings, service: ServiceUnderTest, minutes: Minutes
) -> list[tuple[str, float]]:
    """py-spy over one more evaluation (not one of the measured ones: py-spy slows it)."""
    assert settings.profile is not None
    recording = record(service.pid, 8.0, settings.profile / "evaluate.txt", settings.loadgen_cpu)
    if recording is None:
        return []
    try:
        time.sleep(1.0)  # py-spy attaches
        ev = evaluate(service, minutes)
        say("evaluate", f"one more under py-spy: {ev.server_s:.3f} s (not reported)")
        return recording.finish()
    finally:
        recording.kill()


def _export_latency(
    settings: Settings,
    service: ServiceUnderTest,
    plan: HistoryPlan,
    minutes: Minutes,
    ready_at: float,
) -> ExportLatency:
    """A steady exporter's round trips while idle, then while the full history is evaluated."""
    # The writer runs its first keyspace sweep 60 s after the start: before both windows (the
    # probe's first Export waits for it), not in one of them.
    wait = ready_at + _FIRST_SWEEP_S - time.monotonic()
    if wait > 0:
        say("latency", f"waiting {wait:.0f} s for the writer's first keyspace sweep (60 s in)")
        time.sleep(wait)
    windows = ("idle", "busy")
    period = max(0.001, settings.probe_period_s)
    # One node of the fleet scraping every period, in real time: its points are current (not
    # late for any recorded tick) and after every evaluated window, so the evaluations find
    # what they found before. Each scrape replaces `churn` of its processes: new keys, so
    # stream alerts; a minute boundary (every process written again) comes once a minute.
    spec = FleetSpec(
        nodes=1,
        processes=settings.processes,
        interval_s=period,
        churn=settings.churn,
        start_ms=int(time.time() * 1000),
    )
    at = rfc3339(minutes.take())  # never recorded: dry runs leave it free
    status, body, _ = service.evaluate(at, dry_run=True)
    if status != 200 or not body.get("dry_run"):
        raise RuntimeError(f"dry-run evaluate answered {status}: {body}")
    stream0 = metric_value(service.metrics(), "pathwatch_stream_alerts_total", rule=RULE)
    say(
        "latency",
        f"steady exporter (core {settings.loadgen_cpu}): one {settings.processes}-process scrape "
        f"every {period * 1000:.0f} ms, 1 in flight; {settings.probe_s:.0f} s idle, then "
        f"{settings.probe_s:.0f} s while evaluating {plan.spec.days} d back to back (dry runs)",
    )
    spans: list[tuple[float, float]] = []
    stop = threading.Event()
    failure: list[str] = []
    marks: dict[str, float] = {}

    def evaluate_until_stopped() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                code, answer, _ = service.evaluate(at, dry_run=True)
            except OSError as exc:
                failure.append(f"dry-run evaluate failed: {exc}")
                return
            if code != 200:
                failure.append(f"dry-run evaluate answered {code}: {answer}")
                return
            spans.append((started, time.monotonic()))

    evaluator = threading.Thread(target=evaluate_until_stopped, daemon=True)

    def on_event(event: Event) -> None:
        if event.get("event") != "window":
            return
        marks[event["window"]] = event["at"]
        say("latency", f"{event['window']} window: {settings.probe_s:.0f} s")
        if event["window"] == "busy":
            evaluator.start()

    job = {
        "target": f"127.0.0.1:{service.grpc_port}",
        "source": "probe",
        "spec": spec.to_json(),
        "duration_s": settings.probe_s,
        "period_s": period,
        "windows": list(windows),
        "metrics_url": f"http://127.0.0.1:{service.http_port}/metrics",
    }
    try:
        probe = run_child(
            "bench.loadgen",
            job,
            settings.loadgen_cpu,
            timeout=300 + len(windows) * settings.probe_s,
            on_event=on_event,
            idle_timeout=120 + settings.probe_s,
        )
    finally:
        stop.set()
        if evaluator.is_alive():
            evaluator.join(330)
    if failure:
        raise RuntimeError(failure[0])
    if "busy" not in marks:
        raise RuntimeError("the steady exporter never reached its busy window")
    stream1 = metric_value(service.metrics(), "pathwatch_stream_alerts_total", rule=RULE)
    busy_start, busy_end = marks["busy"], marks["busy"] + settings.probe_s
    ends = [b for _, b in spans]  # the spans are sequential: starts and ends both sorted
    idle, busy, outside = [], [], 0
    for window, began, seconds in probe["samples"]:
        if window == "idle":
            idle.append(seconds)
            continue
        i = bisect.bisect_right(ends, began)  # the first evaluation ending after the start
        if i < len(spans) and spans[i][0] < began + seconds:
            busy.append(seconds)
        else:
            outside += 1
    in_window = [(a, b) for a, b in spans if a < busy_end]
    covered = sum(min(b, busy_end) - max(a, busy_start) for a, b in in_window)
    durations = [b - a for a, b in in_window] or [0.0]
    result = ExportLatency(
        idle=Latency.of(idle),
        busy=Latency.of(busy),
        outside=outside,
        evaluations=len(in_window),
        evaluation_median_s=statistics.median(durations),
        evaluation_max_s=max(durations),
        busy_share=max(0.0, covered) / settings.probe_s,
        stream_alerts=round(stream1 - stream0),
        resources=settings.processes,
        retries=probe["retries"],
        partial=probe["partial"],
    )
    say("latency", f"idle: Export p50 / p99 / max {result.idle.text()}")
    say(
        "latency",
        f"during {result.evaluations} evaluations (median {result.evaluation_median_s:.3f} s, "
        f"{result.busy_share:.0%} of the window): {result.busy.text()}; "
        f"{result.stream_alerts} stream alerts",
    )
    return result


def _offline_evaluate(service: ServiceUnderTest, minutes: Minutes, result: HistoryResult) -> None:
    """`pathwatch evaluate` on the stopped data dir: process start to exit, nothing recorded."""
    at = rfc3339(minutes.take())
    say("evaluate", f"offline: pathwatch evaluate --at {at} (stopped data dir)")
    started = time.perf_counter()
    done = subprocess.run(
        service.command("evaluate", "--at", at),
        capture_output=True,
        env=child_env(),
        timeout=600,
        check=False,
    )
    result.cli_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"pathwatch evaluate failed: {done.stderr.decode()[-2000:]}")
    result.cli_alerts = len(done.stdout.splitlines())
    say("evaluate", f"offline: {result.cli_alerts} alerts in {result.cli_s:.2f} s")


def _compact(data_dir: Path) -> float:
    from pathwatch.store.db import Database

    started = time.perf_counter()
    db = Database(str(data_dir))
    try:
        db.compact()
    finally:
        db.close()
    return time.perf_counter() - started


def median_server_s(evaluations: list[Evaluation]) -> float:
    return statistics.median(e.server_s for e in evaluations)
