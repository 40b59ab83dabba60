"""The reference's way, for comparison: re-read the stored observations and run the rule as SQL.

Run as ``python -m bench.reference JOB_JSON`` (pinned to one core by the orchestrator; DuckDB is
limited to one thread). It loads exactly the observations the load generator sent in each stage
of the HistoryPlan, one row per (key, minute): the resolution pathwatch keeps (each plan key is
observed in one or two minutes, so these rows are also pathwatch's presence runs). After each
stage it runs the reference search, one pass grouped by key over [T - 30 d, T), as an in-memory
DuckDB query: the most favourable setting for the reference (no disk, no index, no parsing).

Prints ``progress`` lines while it writes and loads, then one ``result`` line per run.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import duckdb

from bench import procstat
from bench.otlp import MINUTE_MS
from bench.workload import HistoryPlan, HistorySpec

WINDOW_MINUTES = 60
BASELINE_MINUTES = 30 * 24 * 60

# The reference search: per key over the baseline plus the window, the count in the window and
# the count before it; report keys seen in the window and never before it.
RULE_SQL = """
SELECT host, cluster, node, pid, path, name
FROM observations
WHERE minute >= {baseline_start} AND minute < {tick}
GROUP BY host, cluster, node, pid, path, name
HAVING count(*) FILTER (WHERE minute >= {window_start}) > 0
   AND count(*) FILTER (WHERE minute < {window_start}) = 0
"""


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def write_rows(plan: HistoryPlan, stage: int, path: Path) -> int:
    """Write the stage's observations as CSV; returns the number of rows."""
    rows = 0
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        for key, minute in plan.observations(stage):
            writer.writerow((*key, minute))
            rows += 1
            if rows % 1_000_000 == 0:
                emit("progress", phase="write", stage=stage, rows=rows)
    return rows


def rule_query(tick_minute: int) -> str:
    return RULE_SQL.format(
        baseline_start=tick_minute - BASELINE_MINUTES,
        window_start=tick_minute - WINDOW_MINUTES,
        tick=tick_minute,
    )


def run(job: dict[str, Any]) -> dict[str, Any]:
    plan = HistoryPlan(HistorySpec(**job["spec"]))
    workdir = Path(job["workdir"])
    tick_minute = plan.tick_ms // MINUTE_MS
    con = duckdb.connect(":memory:")
    con.execute(f"SET threads = {int(job.get('threads', 1))}")
    con.execute(
        "CREATE TABLE observations (host VARCHAR, cluster VARCHAR, node VARCHAR, pid BIGINT,"
        " path VARCHAR, name VARCHAR, minute INTEGER)"
    )
    stages = []
    total_rows = 0
    for stage in (0, 1):
        path = workdir / f"observations-{stage}.csv"
        started = time.perf_counter()
        rows = write_rows(plan, stage, path)
        write_s = time.perf_counter() - started
        emit("progress", phase="load", stage=stage, rows=rows)
        started = time.perf_counter()
        con.execute(f"COPY observations FROM '{path}' (FORMAT csv, HEADER false)")
        load_s = time.perf_counter() - started
        path.unlink()
        total_rows += rows
        timings, found = [], 0
        emit("progress", phase="query", stage=stage, rows=total_rows)
        for _ in range(int(job.get("runs", 3))):
            started = time.perf_counter()
            found = len(con.execute(rule_query(tick_minute)).fetchall())
            timings.append(time.perf_counter() - started)
        stages.append(
            {
                "stage": stage,
                "days": plan.stage_days(stage),
                "rows": total_rows,
                "write_s": write_s,
                "load_s": load_s,
                "query_s": timings,
                "query_median_s": statistics.median(timings),
                "found": found,
                "expected": plan.expected_new(stage),
            }
        )
    return {
        "stages": stages,
        "duckdb": duckdb.__version__,
        "peak_rss": procstat.memory(os.getpid()).hwm,
        "sql": rule_query(tick_minute).strip(),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.reference JOB_JSON", file=sys.stderr)
        return 2
    try:
        result = run(json.loads(argv[0]))
    except (duckdb.Error, OSError) as exc:
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    emit("result", **result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
