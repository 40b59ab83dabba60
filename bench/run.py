"""The benchmark run: check the machine, run the phases in order, print the report.

Phases: ingest throughput (bench.ingest), history / memory / evaluation / restart / disk
(bench.history), the DuckDB reference (bench.reference, in a child process). Every child is
reaped and the temporary directory removed, whatever happens (unless --keep).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

from bench import procstat, report
from bench.children import ChildFailed, Event, run_child
from bench.history import run_history
from bench.ingest import IngestResult, run_ingest
from bench.profile import py_spy
from bench.progress import count, say
from bench.service import RULE
from bench.settings import (
    SIZE_FIELDS,
    Settings,
    parse_args,
    replica_channels,
    replica_concurrency,
)

# A schedule that never fires during a run: the benchmark evaluates through the API itself.
_OFF_SCHEDULE = "0 0 1 1 *"


def service_config(settings: Settings, *, flood_guards: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "store": {"fsync": settings.fsync},
        # The bench replays days of history over OTLP: every timestamp counts as baseline (the
        # default distrusts points that arrive more than an hour late, as history does).
        "receiver": {"max_baseline_lateness": "0s"},
        # delay 0s: the API refuses a tick until its window plus the rule's delay has passed,
        # and the bench evaluates the minute that just ended. no_baseline alert: every new key
        # is an alert, as in the reference (every cluster has history here in any case).
        "rules": [{"id": RULE, "schedule": _OFF_SCHEDULE, "delay": "0s", "no_baseline": "alert"}],
    }
    if not flood_guards:
        config["limits"] = {"new_keys_per_host_per_hour": 0, "new_keys_per_hour": 0}
    # The load generator is one sender (one address) for the whole fleet, where a real fleet
    # has one per node: the per-sender new-key cap (100,000 an hour) would refuse half of a
    # 200,000-process fleet, and every scrape of a refused process takes the full path.
    config.setdefault("limits", {})["new_keys_per_sender_per_hour"] = 0
    return config


def check_machine(settings: Settings) -> str | None:
    """Why the benchmark cannot run as configured, or None."""
    wanted = {c for c in (settings.service_cpu, settings.loadgen_cpu) if c is not None}
    if wanted and shutil.which("taskset") is None:
        return "taskset (util-linux) is needed to pin the service; or pass --service-cpu -1"
    if settings.reference and importlib.util.find_spec("duckdb") is None:
        return "the DuckDB comparison needs duckdb: pip install duckdb (or pass --no-reference)"
    if settings.profile is not None and py_spy() is None:
        return "--profile needs py-spy: pip install py-spy"
    missing = wanted - os.sched_getaffinity(0)
    if missing:
        return f"cores {sorted(missing)} are not available here (see --service-cpu, --loadgen-cpu)"
    if settings.service_cpu is not None and settings.service_cpu == settings.loadgen_cpu:
        return "the service and the load generator need different cores"
    return None


def run_reference(settings: Settings, workdir: Path, spec: dict[str, Any]) -> Event:
    def on_event(event: Event) -> None:
        phase = {"write": "writing CSV", "load": "loading", "query": "querying"}[event["phase"]]
        say("duckdb", f"stage {event['stage'] + 1}/2: {phase}, {count(event['rows'])} rows")

    say("duckdb", f"reference rule as SQL, DuckDB on core {settings.service_cpu}, 1 thread")
    result = run_child(
        "bench.reference",
        {"spec": spec, "workdir": str(workdir), "runs": 3, "threads": 1},
        settings.service_cpu,
        timeout=1800 + settings.keys / 5_000,
        on_event=on_event,
    )
    for stage in result["stages"]:
        say(
            "duckdb",
            f"{stage['days']} d, {count(stage['rows'])} rows: median {stage['query_median_s']:.3f}"
            f" s, {stage['found']} new keys (expected {stage['expected']})",
        )
    return result


def run_replica(settings: Settings, workdir: Path, ingest: IngestResult) -> IngestResult:
    """The ingest phase again with receiver.grpc.processes > 1, the service and the load
    generator on every core this bench may use, over more connections (`replica_channels`)."""
    cores = ",".join(str(c) for c in sorted(procstat.ALL_CORES))
    again = dataclasses.replace(
        settings,
        profile=None,
        channels=replica_channels(settings),
        concurrency=replica_concurrency(settings),
    )
    say(
        "ingest",
        f"per replica: receiver.grpc.processes {settings.replica_processes}, the service and "
        f"the load generator sharing cores {cores}, {again.concurrency} Exports in flight over "
        f"{again.channels} connections",
    )
    config = service_config(again, flood_guards=True)
    config["receiver"]["grpc"] = {"processes": settings.replica_processes}
    return run_ingest(again, workdir, config, parse=ingest.parse, shared=cores)


def describe_size(settings: Settings) -> str:
    """'full size', 'QUICK ...', or the parameters that differ from the issue's sizes."""
    if settings.quick:
        return "QUICK (sizes ~100x below the issue's)"
    default = Settings()
    changed = [
        f"{f.name}={getattr(settings, f.name)}"
        for f in dataclasses.fields(Settings)
        if f.name in SIZE_FIELDS and getattr(settings, f.name) != getattr(default, f.name)
    ]
    return f"CUSTOM ({', '.join(changed)})" if changed else "full size"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so that every `finally` reaps its children and temp dirs


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    problem = check_machine(settings)
    if problem is not None:
        print(f"bench: {problem}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    if settings.loadgen_cpu is not None:
        os.sched_setaffinity(0, {settings.loadgen_cpu})  # stay off the service's core
    machine = report.Machine.detect()
    size = describe_size(settings)
    say("bench", f"pathwatch benchmark, {size}; {machine.cores} cores, {machine.cpu_model}")
    workdir = Path(tempfile.mkdtemp(prefix="pathwatch-bench-", dir=settings.workdir))
    try:
        ingest = run_ingest(settings, workdir, service_config(settings, flood_guards=True))
        shutil.rmtree(workdir / "ingest", ignore_errors=True)
        # The per-replica run next, as close in time as it can be to the 1-process run it is
        # set against: this machine's speed drifts by tens of percent over minutes.
        replica = None
        if settings.replica_processes > 1:
            replica = run_replica(settings, workdir, ingest)
            shutil.rmtree(workdir / "ingest", ignore_errors=True)
        second = None
        if settings.second_interval_s > 0:
            say("ingest", f"again with a scrape every {settings.second_interval_s:g} s")
            again = dataclasses.replace(settings, interval_s=settings.second_interval_s,
                                        profile=None)  # fmt: skip
            config = service_config(again, flood_guards=True)
            second = run_ingest(again, workdir, config, parse=ingest.parse)
            shutil.rmtree(workdir / "ingest", ignore_errors=True)
        history = run_history(settings, workdir, service_config(settings, flood_guards=False))
        reference = None
        if settings.reference:
            try:
                reference = run_reference(settings, workdir, history.plan.spec.to_json())
            except ChildFailed as exc:  # the service's figures are still worth printing
                say("duckdb", f"failed, reported without it: {exc}")
    except (ChildFailed, RuntimeError, OSError) as exc:
        print(f"bench: failed: {exc}")
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted")
        return 130
    finally:
        if settings.keep:
            say("bench", f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"== pathwatch benchmark: {size} ==")
    print(report.describe_machine(machine, settings))
    print(report.describe_workload(settings, ingest, history, second, replica))
    print()
    print(report.render_table(report.rows(settings, ingest, history, reference, second, replica)))
    for title, top in (
        ("ingest (steady-state fleet)", ingest.profile),
        ("history ingest (new keys)", history.profile),
        ("one evaluation, 30 d of history", history.evaluate_profile),
    ):
        text = report.describe_profile(title, top)
        if text:
            print()
            print(text)
    return 0
