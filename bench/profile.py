"""Sampling profiles of the service under load with py-spy (``--profile DIR``).

py-spy attaches to the running service (root, or ptrace permission, needed) without pausing it
(``--nonblocking``) and samples only the thread holding the GIL (``--gil``): on one core that
is the Python work, without the threads that wait on locks, queues or gRPC's completion queue.
It writes collapsed stacks ("frame;frame;... count" lines). Self time is the share of samples
whose innermost frame is a function: that is what to optimise first.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.service import pinned


def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH; None when not installed."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


@dataclass
class Recording:
    """One py-spy recording in progress; `finish` waits for it (bounded) and reaps it."""

    proc: subprocess.Popen[bytes]
    output: Path
    seconds: float

    def finish(self) -> list[tuple[str, float]]:
        """Wait for the recording; return the top functions by self time (share of samples)."""
        try:
            self.proc.wait(self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return []
        return top_self(self.output) if self.output.exists() else []

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def record(pid: int, seconds: float, output: Path, cpu: int | None) -> Recording | None:
    """Start recording `pid` for `seconds` (raw collapsed stacks into `output`)."""
    exe = py_spy()
    if exe is None:
        return None
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", "100", "--gil", "--nonblocking", "--format", "raw",
            "--output", str(output)]  # fmt: skip
    proc = subprocess.Popen(pinned(cpu, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Recording(proc, output, seconds)


def top_self(collapsed: Path, limit: int = 15) -> list[tuple[str, float]]:
    """(function (file), share of samples) with the most self time, largest first."""
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        name, _, where = leaf.partition(" (")
        counts[f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})"] += int(number)
        total += int(number)
    return [(name, n / total) for name, n in counts.most_common(limit)] if total else []
