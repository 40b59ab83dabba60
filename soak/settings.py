"""The soak's parameters. Defaults are what `make soak` runs: 10 minutes, 4 senders."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    duration_s: float = 600.0
    seed: int | None = None
    senders: int = 4
    hosts: int = 5
    processes: int = 40
    interval_s: float = 2.0
    churn: float = 0.01
    host_churn: float = 0.01
    history_rate: float = 0.15
    kill_every_s: float = 50.0
    checkpoint_every_s: float = 40.0
    past_hours: int = 48
    sink_failure_rate: float = 0.02
    fsync: bool = True
    workdir: Path | None = None
    keep: bool = False


_HELP = {
    "duration_s": "seconds of load, kills and checkpoints before the final checks",
    "seed": "seed of every random choice (printed at the start; timing still varies)",
    "senders": "sender threads, each exporting for its own hosts",
    "hosts": "live hosts per sender (hosts leave and new ones join: --host-churn)",
    "processes": "tracked processes per host (plus four kernel threads, untracked)",
    "interval_s": "seconds between two scrape rounds of a sender",
    "churn": "share of a host's processes that exit (replaced by new pids) per round",
    "host_churn": "chance per round that one of a sender's hosts leaves and a new one joins",
    "history_rate": "chance per host and round of an export stamped minutes to weeks ago",
    "kill_every_s": "mean seconds between two kill -9 (exponential; 0: never)",
    "checkpoint_every_s": "mean seconds between two checkpoints (quiesce, evaluate, compare)",
    "past_hours": "past hourly ticks evaluated through the API, oldest first (at most 70)",
    "sink_failure_rate": "share of webhook requests answered 503 (retried by pathwatch)",
}


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m soak",
        description="pathwatch soak and crash harness: the real service under concurrent "
        "senders with churn and out-of-order history, kill -9 at random moments, every tick "
        "compared with an exact model of the acknowledged observations, every alert counted "
        "at a webhook receiver. Prints one table; exits 1 on any lost observation, wrong "
        "alert or undelivered alert.",
    )
    defaults = Settings()
    for f in fields(Settings):
        if f.name in _HELP:
            kind = (
                int if f.name in ("seed", "senders", "hosts", "processes", "past_hours") else float
            )
            parser.add_argument(
                "--" + f.name.removesuffix("_s").replace("_", "-"),
                dest=f.name,
                type=kind,
                default=None,
                help=f"{_HELP[f.name]} (default {getattr(defaults, f.name)})",
            )
    parser.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        default=True,
        help="run the service with store.fsync false",
    )
    parser.add_argument("--workdir", type=Path, metavar="DIR", help="where the temp dir goes")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and the logs")
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if v is not None}
    settings = dataclasses.replace(defaults, **values)
    if not 0 < settings.past_hours <= 70:
        parser.error("--past-hours must be between 1 and 70 (the evaluate API reaches 3 days)")
    if settings.duration_s <= 0 or settings.senders < 1 or settings.hosts < 1:
        parser.error("--duration, --senders and --hosts must be positive")
    return settings
