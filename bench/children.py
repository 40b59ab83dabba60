"""Bench child processes that report in JSON lines (load generator, parse baseline, DuckDB).

A child prints ``{"event": ...}`` lines on stdout: ``progress`` lines while it works, then one
``result`` or ``error``. `run_child` relays each line to a callback, enforces a deadline and
always reaps the child, killing it on error, timeout or interruption.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from bench.service import Cpus, child_env, pinned

Event = dict[str, Any]


class ChildFailed(RuntimeError):
    """A child reported an error, exited without a result, or ran past its deadline."""


def run_child(
    module: str,
    job: dict[str, Any],
    cpu: Cpus,
    timeout: float,
    on_event: Callable[[Event], None] = lambda event: None,
    idle_timeout: float | None = None,
) -> Event:
    """Run ``python -m module JOB_JSON`` pinned to `cpu`; return its ``result`` event.

    Fails (ChildFailed) past `timeout` seconds in all, or `idle_timeout` seconds without a line
    from the child: a child that reports progress regularly may run long, but not stall.
    """
    argv = pinned(cpu, [sys.executable, "-m", module, json.dumps(job)])
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=stderr, env=child_env(), text=True
        )
        lines: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        idle = idle_timeout or timeout
        try:
            while True:
                wait = min(deadline - time.monotonic(), idle)
                try:
                    line = lines.get(timeout=max(0.01, wait))
                except queue.Empty:
                    raise ChildFailed(
                        f"{module} did not finish within {timeout:.0f} s"
                        if time.monotonic() >= deadline
                        else f"{module} reported nothing for {idle:.0f} s"
                    ) from None
                if line is None:
                    proc.wait(10)
                    raise ChildFailed(
                        f"{module} exited with {proc.returncode} and no result:\n" + _tail(stderr)
                    )
                event = _parse(line)
                if event is None:
                    continue
                if event.get("event") == "result":
                    proc.wait(30)
                    return event
                if event.get("event") == "error":
                    raise ChildFailed(f"{module}: {event.get('message')}\n{_tail(stderr)}")
                on_event(event)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            reader.join(5)


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _parse(line: str) -> Event | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _tail(stderr: IO[bytes], lines: int = 15) -> str:
    stderr.seek(0)
    return "\n".join(stderr.read().decode(errors="replace").splitlines()[-lines:])
