"""Phase 1, ingest throughput: the service on one core against the parse-only baseline.

A fresh service takes the steady-state fleet from the load generator (on another core) until
every node has scraped once, then `warmup` seconds, then `duration` seconds measured. Then, with
the service stopped, the parse-only baseline runs on the same core the service had.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat
from bench.children import Event, run_child
from bench.otlp import HOUR_MS
from bench.profile import Recording, record
from bench.progress import count, megabytes, say
from bench.service import Cpus, ServiceUnderTest, child_env, pinned
from bench.settings import Settings
from bench.workload import Fleet, FleetSpec

_PROFILE_S = 10.0  # py-spy slows the service: it records after the measurement, not during
_MAX_RATE = 200_000  # resources/s no single core reaches: sizes the simulated-time head start


@dataclass
class IngestResult:
    fleet: Event
    parse: Event
    spec: FleetSpec
    request_bytes: int
    request_gzip_bytes: int
    service_rss: int
    service_hwm: int
    head_start_s: float
    profile: list[tuple[str, float]] = field(default_factory=list)
    # The receive-only baseline (bench.receive): the fleet's figures against a gRPC server
    # that acknowledges without decoding; None where it was not run.
    receive: Event | None = None


def fleet_spec(settings: Settings) -> FleetSpec:
    """The fleet, starting far enough in the past that no timestamp passes the present."""
    # + up to two simulated minutes of the fleet: the window is aligned to them
    seconds = settings.warmup_s + settings.duration_s + _PROFILE_S + 180
    scrapes = seconds * _MAX_RATE / (settings.nodes * settings.processes)
    head_start = max(2 * HOUR_MS, int(scrapes * settings.interval_s * 1000))
    return FleetSpec(
        nodes=settings.nodes,
        processes=settings.processes,
        interval_s=settings.interval_s,
        churn=settings.churn,
        start_ms=int(time.time() * 1000) - head_start,
    )


def run_ingest(
    settings: Settings,
    workdir: Path,
    config: dict[str, Any],
    parse: Event | None = None,
    shared: str | None = None,
) -> IngestResult:
    """The ingest phase; the parse-only baseline too unless `parse` (the same requests'
    figure from an earlier run: the scrape interval changes timestamps, not the bytes parsed).
    `shared` (a taskset core list): the service and the load generator both run on those
    cores instead of one core each; CPU and memory then count every process of the service."""
    started_ms = int(time.time() * 1000)
    spec = fleet_spec(settings)
    sample = next(Fleet(FleetSpec(**{**spec.to_json(), "nodes": 1})).requests()).payload
    service_cpu: Cpus = settings.service_cpu if shared is None else shared
    loadgen_cpu: Cpus = settings.loadgen_cpu if shared is None else shared
    service = ServiceUnderTest(workdir, "ingest", service_cpu, config)
    recording: Recording | None = None
    profile: list[tuple[str, float]] = []
    try:
        say("ingest", f"starting the service ({_cores(service_cpu)}), fresh data dir")
        service.start()

        def on_event(event: Event) -> None:
            nonlocal recording
            if event["event"] == "measure":
                say(
                    "ingest",
                    f"measuring for at least {settings.duration_s:.0f} s, in whole simulated "
                    "minutes of the fleet",
                )
                return
            if event["event"] == "extra" and settings.profile is not None:
                say("ingest", f"measured; py-spy records the service for {_PROFILE_S:.0f} s more")
                settings.profile.mkdir(parents=True, exist_ok=True)
                out = settings.profile / "ingest.txt"
                recording = record(service.pid, _PROFILE_S, out, settings.loadgen_cpu)
                return
            say(
                "ingest",
                f"{event['phase']:<7} {event['elapsed']:6.1f} s  "
                f"{count(event['resources'])} resources acknowledged, "
                f"{count(event['rate'])}/s",
            )

        say(
            "ingest",
            f"load generator ({_cores(loadgen_cpu)}): {settings.nodes} nodes x "
            f"{settings.processes} processes, first scrape of every node, then "
            f"{settings.warmup_s:.0f} s warm-up",
        )
        job = {
            "target": f"127.0.0.1:{service.grpc_port}",
            "source": "fleet",
            "spec": spec.to_json(),
            "concurrency": settings.concurrency,
            "channels": settings.channels,
            "warmup_s": settings.warmup_s,
            "duration_s": settings.duration_s,
            "extra_s": _PROFILE_S + 1 if settings.profile is not None else 0.0,
            "service_pid": service.pid,
            "progress_s": 2.0,
        }
        fleet = run_child(
            "bench.loadgen",
            job,
            loadgen_cpu,
            timeout=900 + settings.warmup_s + settings.duration_s + _PROFILE_S,
            on_event=on_event,
        )
        mem = procstat.tree_memory(service.pid)
        if recording is not None:
            profile = recording.finish()
        say(
            "ingest",
            f"{count(fleet['resources_per_s'])} resources/s acknowledged, service CPU "
            f"{fleet['service_cpu']:.2f} cores, load generator {fleet['loadgen_cpu']:.2f}, "
            f"RSS {megabytes(mem.rss)}",
        )
    finally:
        if recording is not None:
            recording.kill()
        try:
            service.stop()
        finally:
            service.kill()
    if parse is not None:
        return _result(fleet, parse, spec, sample, mem, started_ms, profile)
    receive = run_receive_only(settings, spec)
    say(
        "parse",
        f"parse-only baseline on core {settings.service_cpu}: ExportMetricsServiceRequest."
        f"FromString over {settings.parse_requests} requests for {settings.parse_seconds:.0f} s",
    )
    parse = run_child(
        "bench.parse",
        {
            "spec": spec.to_json(),
            "requests": settings.parse_requests,
            "seconds": settings.parse_seconds,
        },
        settings.service_cpu,
        timeout=300 + settings.parse_seconds,
    )
    say("parse", f"{count(parse['resources_per_s'])} resources/s parsed")
    result = _result(fleet, parse, spec, sample, mem, started_ms, profile)
    result.receive = receive
    return result


_RECEIVE_S = 30.0  # measured seconds of the receive-only baseline (at least; whole minutes)
_READY_S = 30.0


def run_receive_only(settings: Settings, spec: FleetSpec) -> Event:
    """The load generator's fleet against bench.receive on the service's core: resources
    acknowledged per CPU-second of a gRPC server that does nothing else (the floor of the
    service's own cost: receiving, framing, gzip)."""
    say(
        "receive",
        f"receive-only baseline on core {settings.service_cpu}: the same fleet against a gRPC "
        f"server that acknowledges without decoding, {_RECEIVE_S:.0f} s",
    )
    argv = pinned(settings.service_cpu, [sys.executable, "-m", "bench.receive"])
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env(), text=True
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], _READY_S)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"bench.receive did not start within {_READY_S:.0f} s")
        port = json.loads(line)["port"]
        job = {
            "target": f"127.0.0.1:{port}",
            "source": "fleet",
            "spec": spec.to_json(),
            "concurrency": settings.concurrency,
            "channels": settings.channels,
            "warmup_s": settings.warmup_s,
            "duration_s": min(settings.duration_s, _RECEIVE_S),
            "extra_s": 0.0,
            "service_pid": proc.pid,
            "progress_s": 5.0,
        }
        fleet = run_child(
            "bench.loadgen",
            job,
            settings.loadgen_cpu,
            timeout=600 + settings.warmup_s + _RECEIVE_S,
            on_event=lambda event: None,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    per_cpu = fleet["resources_per_s"] / max(fleet["service_cpu"], 1e-9)
    say(
        "receive",
        f"{count(fleet['resources_per_s'])} resources/s acknowledged at "
        f"{fleet['service_cpu']:.2f} cores: {count(per_cpu)} per CPU-second",
    )
    return fleet


def _cores(cpus: Cpus) -> str:
    return (
        "any core" if cpus is None else f"core {cpus}" if isinstance(cpus, int) else f"cores {cpus}"
    )


def _result(
    fleet: Event,
    parse: Event,
    spec: FleetSpec,
    sample: bytes,
    mem: procstat.Memory,
    started_ms: int,
    profile: list[tuple[str, float]],
) -> IngestResult:
    return IngestResult(
        fleet=fleet,
        parse=parse,
        spec=spec,
        request_bytes=len(sample),
        request_gzip_bytes=len(zlib.compress(sample, 6)),
        service_rss=mem.rss,
        service_hwm=mem.hwm,
        head_start_s=(started_ms - spec.start_ms) / 1000,
        profile=profile,
    )
