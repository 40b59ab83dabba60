"""The parse-only baseline: how fast one core merely parses the fleet's requests.

Run as ``python -m bench.parse JOB_JSON`` (pinned to one core by the orchestrator). It builds the
first `requests` requests of the same Fleet the load generator sends, uncompressed, then calls
``ExportMetricsServiceRequest.FromString`` over them in a loop for at least `seconds`, and prints
one JSON line: resources and data points parsed per second. Nothing else runs in the loop: no
decompression, no key extraction, no storage.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from bench import procstat
from bench.workload import Fleet, FleetSpec


def measure(spec: FleetSpec, requests: int, seconds: float) -> dict[str, Any]:
    source = Fleet(spec).requests()
    payloads = [next(source) for _ in range(requests)]
    parse = ExportMetricsServiceRequest.FromString
    for export in payloads[: min(10, requests)]:  # warm up allocator and caches
        parse(export.payload)
    parsed = resources = points = 0
    cpu0, started = procstat.cpu_seconds(), time.perf_counter()
    while True:
        for export in payloads:
            parse(export.payload)
            resources += export.resources
            points += export.points
            parsed += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
    return {
        "requests": parsed,
        "seconds": elapsed,
        "resources_per_s": resources / elapsed,
        "points_per_s": points / elapsed,
        "cpu": (procstat.cpu_seconds() - cpu0) / elapsed,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.parse JOB_JSON", file=sys.stderr)
        return 2
    job = json.loads(argv[0])
    result = measure(FleetSpec(**job["spec"]), job["requests"], job["seconds"])
    print(json.dumps({"event": "result", **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
