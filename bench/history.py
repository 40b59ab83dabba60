"""Phase 2: memory while the history is ingested, evaluation, restart and disk.

One service (one data dir) takes the HistoryPlan's two stages through gRPC while its RSS is
sampled every second. After each stage the built-in rule is evaluated through the API, each
time at a different minute (the API records every tick). Then: a clean stop, the offline
`pathwatch evaluate`, a timed restart to /readyz 200 with one more evaluation, a stop, a full
RocksDB compaction, and the data dir's size per stored key.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat
from bench.children import Event, run_child
from bench.otlp import MINUTE_MS
from bench.profile import Recording, record
from bench.progress import count, megabytes, say
from bench.service import RULE, ServiceUnderTest, child_env, metric_value
from bench.settings import Settings
from bench.workload import HistoryPlan, HistorySpec

MILESTONES = (10, 50, 100)  # percent of the keys at which RSS is reported


@dataclass(frozen=True)
class Evaluation:
    at: str
    http_s: float  # the POST, as the client sees it
    server_s: float  # pathwatch_evaluation_duration_seconds of this tick
    alerts: int  # risk events in the response (summary events excluded)
    duplicates: int  # findings gated as already alerted (pathwatch_alerts_gated_total)
    response_bytes: int


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
    shutdown_s: float = 0.0
    cli_s: float = 0.0
    cli_alerts: int = 0
    restart_s: float = 0.0
    restart_eval: Evaluation | None = None
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
            result.loads.append(_load_stage(settings, service, plan, stage, stored, result))
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
        say("restart", f"starting again on {count(result.keys_created)} stored keys")
        result.restart_s = service.start()
        say("restart", f"ready (/readyz 200) {result.restart_s:.2f} s after exec")
        result.restart_eval = evaluate(service, minutes)
        say("restart", f"evaluation right after the restart: {result.restart_eval.server_s:.3f} s")
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
