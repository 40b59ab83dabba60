"""Progress lines on stdout while the benchmark runs: elapsed time, phase, what it is doing."""

from __future__ import annotations

import time

_STARTED = time.monotonic()


def say(phase: str, message: str) -> None:
    """Print one progress line, flushed at once (the run takes minutes; show it moving)."""
    elapsed = time.monotonic() - _STARTED
    print(f"[{int(elapsed) // 60:3d}:{elapsed % 60:04.1f}] {phase:<9} {message}", flush=True)


def count(n: float) -> str:
    """12345678 -> '12,345,678'."""
    return f"{round(n):,}"


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"
