"""The benchmark's parameters: defaults are the performance issue's sizes; --quick is ~100x less."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    # ingest throughput: a steady-state fleet
    nodes: int = 1000
    processes: int = 200
    interval_s: float = 60.0  # the collector's hostmetrics default, and deploy/'s
    second_interval_s: float = 10.0  # the ingest phase again at this interval (0: skip)
    # the ingest phase again with receiver.grpc.processes this and every core (0, 1: skip)
    replica_processes: int = 2
    churn: float = 0.005
    concurrency: int = 8
    channels: int = 4
    warmup_s: float = 3.0
    # Long enough for several fold cycles (one per 10 simulated minutes of the fleet).
    duration_s: float = 120.0
    parse_requests: int = 100
    parse_seconds: float = 10.0
    # memory, evaluation, restart, disk: the stored history
    keys: int = 10_000_000
    active: int = 200_000
    new_fraction: float = 0.01
    days: int = 30
    short_days: int = 7
    evaluations: int = 3
    # Export latency while idle and while evaluating: a steady exporter, one scrape a period
    probe_s: float = 30.0
    probe_period_s: float = 0.05
    # where things run
    service_cpu: int | None = 1
    loadgen_cpu: int | None = 0
    fsync: bool = True
    reference: bool = True
    profile: Path | None = None
    workdir: Path | None = None
    keep: bool = False
    quick: bool = False


def replica_channels(settings: Settings) -> int:
    """Connections of the per-replica run: the kernel spreads connections (not calls) over
    receiver processes, so enough of them that the split is even, as in a real fleet with a
    connection per node."""
    return max(settings.channels, 16 * settings.replica_processes)


def replica_concurrency(settings: Settings) -> int:
    """Exports in flight in the per-replica run: as many per receiver process as the 1-core
    run has in all (an Export waits for a durable write; a fleet has a collector per node)."""
    return settings.concurrency * settings.replica_processes


SIZE_FIELDS = frozenset(
    ("nodes", "processes", "interval_s", "second_interval_s", "replica_processes", "churn",
     "concurrency",
     "channels", "warmup_s", "duration_s", "parse_requests", "parse_seconds", "keys", "active",
     "new_fraction", "days", "short_days", "evaluations", "probe_s", "probe_period_s")
)  # fmt: skip

QUICK = Settings(
    nodes=10,
    keys=100_000,
    active=2_000,
    warmup_s=1.0,
    duration_s=10.0,
    parse_requests=20,
    parse_seconds=2.0,
    probe_s=10.0,
    quick=True,
)

_HELP = {
    "nodes": "nodes in the ingest fleet (each sends one request of --processes per scrape)",
    "processes": "process resources per request (per node scrape)",
    "interval_s": "simulated seconds between two scrapes of a node",
    "second_interval_s": "the ingest phase again with this interval, for the second row "
    "(0 skips it)",
    "replica_processes": "receiver.grpc.processes for the per-replica row: the ingest phase "
    "again with the service and the load generator on every core (0 or 1 skips it)",
    "churn": "share of a node's processes replaced by a new pid at every scrape",
    "concurrency": "Export calls in flight from the load generator",
    "channels": "gRPC connections the load generator spreads its calls over",
    "warmup_s": "seconds of load after the fleet's first scrape, before measuring (which then "
    "starts at the next whole simulated minute of the fleet)",
    "duration_s": "seconds of measured ingest, at least (rounded up to whole simulated "
    "minutes of the fleet)",
    "parse_requests": "distinct requests the parse-only baseline loops over",
    "parse_seconds": "seconds the parse-only baseline runs",
    "keys": "distinct keys stored for the memory / evaluation / restart / disk phase",
    "active": "keys observed in the evaluation window",
    "new_fraction": "share of the active keys with no earlier observation (the alerts)",
    "days": "history length (the rule's baseline is 30 days)",
    "short_days": "the shorter history length evaluated first",
    "evaluations": "evaluations per history length (each at a different minute)",
    "probe_s": "seconds the steady exporter is measured while idle, and again while the full "
    "history is evaluated back to back",
    "probe_period_s": "seconds between two Exports of the steady exporter (one node's scrape)",
    "service_cpu": "core the service is pinned to (-1: no pinning)",
    "loadgen_cpu": "core the load generator, DuckDB and py-spy are pinned to (-1: none)",
}


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="pathwatch performance benchmark: starts the real service, drives it over "
        "gRPC from a separate process, prints one table of results.",
    )
    for f in fields(Settings):
        if f.name in _HELP:
            parser.add_argument(
                "--" + f.name.removesuffix("_s").replace("_", "-"),
                dest=f.name,
                type=float if "float" in str(f.type) else int,
                default=None,
                help=f"{_HELP[f.name]} (default {f.default}; --quick: {getattr(QUICK, f.name)})",
            )
    parser.add_argument("--quick", action="store_true", help="every size ~100x smaller (~2 min)")
    parser.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        default=True,
        help="run the service with store.fsync false (default: true)",
    )
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        default=True,
        help="skip the DuckDB reference comparison",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also record py-spy profiles of the service under load in DIR",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="where the temporary data dirs go (default: system temp)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if v is not None}
    for name in ("service_cpu", "loadgen_cpu"):
        if values.get(name) == -1:
            values[name] = None
    return dataclasses.replace(QUICK if args.quick else Settings(), **values)
