"""Readings of a running process from /proc: resident memory and CPU time (Linux only)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

_TICKS = os.sysconf("SC_CLK_TCK")
# The cores this bench may use, read at import: before the run pins itself to one of them.
ALL_CORES = frozenset(os.sched_getaffinity(0))


@dataclass(frozen=True, slots=True)
class Memory:
    rss: int  # VmRSS, bytes
    hwm: int  # VmHWM: peak RSS since the process started, bytes


def memory(pid: int) -> Memory:
    """VmRSS and VmHWM of `pid`. Raises OSError when the process is gone."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _unit = line.split()
                values[name[:-1]] = int(amount) * 1024
    return Memory(values.get("VmRSS", 0), values.get("VmHWM", 0))


def cpu_seconds(pid: int | None = None) -> float:
    """User plus system CPU time of every thread of `pid` (this process when None)."""
    with open(f"/proc/{pid or 'self'}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def tree(pid: int) -> list[int]:
    """`pid` and its descendants alive now (a service's receiver worker processes)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as children:
                    todo.extend(int(c) for c in children.read().split())
            except OSError:
                continue
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and its live descendants (one process: the same as cpu_seconds)."""
    total = 0.0
    for member in tree(pid):
        try:
            total += cpu_seconds(member)
        except OSError:
            continue  # exited meanwhile
    return total


def tree_memory(pid: int) -> Memory:
    """RSS and peak RSS summed over `pid` and its live descendants."""
    rss = hwm = 0
    for member in tree(pid):
        try:
            m = memory(member)
        except OSError:
            continue
        rss, hwm = rss + m.rss, hwm + m.hwm
    return Memory(rss, hwm)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ('unknown' when it has none)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


@dataclass
class RssSampler:
    """Samples a process's RSS every `interval_s` on a daemon thread until `stop`.

    Keeps every sample (time, rss) and the largest VmHWM read, which also covers peaks between
    samples. A process that exits ends the sampling silently.
    """

    pid: int
    interval_s: float = 1.0
    samples: list[tuple[float, int]] = field(default_factory=list)
    peak_hwm: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    def sample(self) -> Memory | None:
        try:
            reading = memory(self.pid)
        except OSError:
            return None
        self.samples.append((time.monotonic(), reading.rss))
        self.peak_hwm = max(self.peak_hwm, reading.hwm)
        return reading

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
