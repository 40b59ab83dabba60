"""Renders the metric catalogue as docs/metrics.md: `python -m pathwatch.telemetry.docs`."""

from __future__ import annotations

import sys

from pathwatch.telemetry.metrics import Metrics

HEADER = """# Metrics

Every metric pathwatch exports on `GET /metrics`, generated from the catalogue in
`service/pathwatch/telemetry/metrics.py` (`make docs` rewrites this file; a test checks it is
current). Labels are bounded by configuration: rule ids, sink names and fixed outcome words;
never a host, path or pid.

| name | type | labels | meaning |
| --- | --- | --- | --- |
"""


def render() -> str:
    rows = [
        f"| `{s.name}` | {s.kind} | {', '.join(s.labels) or '-'} | {s.help} |"
        for s in Metrics().specs
    ]
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
