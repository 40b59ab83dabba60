"""Logs: JSON lines for machines, readable lines on a terminal, nothing per request at info."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import Proc, ServiceProcess, export, process_request, wait_until

pytestmark = pytest.mark.integration


def test_json_lines_with_required_fields(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """Every stdout line is a JSON object with timestamp, level, event and component; an
    export at info level logs nothing."""
    svc = service_factory(tmp_path / "data", {"log": {"level": "info", "format": "auto"}}).start()
    before = len(svc.lines)
    now = time.time_ns() // 1_000_000
    export(svc.grpc_port, process_request([Proc(1, "/bin/x")], now))
    # A positive barrier: the evaluation's log line comes after anything the export logged.
    svc.evaluate(now - now % 60_000 - 60_000)
    wait_until(lambda: any('"rule evaluated"' in line for line in svc.lines[before:]))
    # The scheduler may log a tick meanwhile; the ingest path must log nothing.
    ingest = [line for line in svc.lines[before:]
              if '"component": "receiver"' in line or '"component": "store"' in line]  # fmt: skip
    assert ingest == []
    svc.stop()
    for line in svc.lines:
        record = json.loads(line)
        assert {"timestamp", "level", "event", "component"} <= record.keys()
        assert record["timestamp"].endswith("Z")


def test_console_output_on_a_terminal(tmp_path: Path) -> None:
    """With stdout on a terminal and format auto, lines are human-readable, not JSON."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        "receiver: {grpc: {listen: '127.0.0.1:0'}, http: {listen: '127.0.0.1:0'}}\n"
        "http: {listen: '127.0.0.1:0'}\n"
    )
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHWATCH_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pathwatch", "serve", "--config", str(cfg)],
        stdout=follower, stderr=follower, env=env,
    )  # fmt: skip
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 20
    try:
        while b"pathwatch started" not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    out += os.read(leader, 4096)
                except OSError:
                    break
    finally:
        proc.terminate()
        proc.wait(20)
        os.close(leader)
    text = out.decode(errors="replace")
    assert "pathwatch started" in text
    assert not text.lstrip().startswith("{")
