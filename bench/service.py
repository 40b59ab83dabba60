"""ServiceUnderTest: the real `python -m pathwatch serve`, pinned to a core, on loopback ports.

The service logs at warning level (nothing per request), so its ports are chosen here rather
than read from its log. Every wait is bounded; `kill` is safe at any time and twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

RULE = "kubernetes_process_running_from_new_path"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the service binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


Cpus = int | str | None  # one core, a taskset list ("0,1"), or None: not pinned


def pinned(cpu: Cpus, argv: list[str]) -> list[str]:
    """`argv` under `taskset -c cpu` (unchanged when `cpu` is None)."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def child_env() -> dict[str, str]:
    """The environment for pathwatch and bench children: no PATHWATCH_* overrides, bench
    importable from the repository root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHWATCH_")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class ServiceUnderTest:
    """One data directory served by successive runs of the service (start, stop, start...)."""

    def __init__(self, workdir: Path, name: str, cpu: Cpus, config: dict[str, Any]) -> None:
        self.data_dir = workdir / name
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.cpu = cpu
        self.config: dict[str, Any] = {
            **config,
            "data_dir": str(self.data_dir),
            "receiver": {
                **config.get("receiver", {}),
                "grpc": {
                    **config.get("receiver", {}).get("grpc", {}),
                    "listen": f"127.0.0.1:{self.grpc_port}",
                },
                # OTLP/HTTP is not measured; a free port keeps two runs from colliding
                "http": {"listen": f"127.0.0.1:{free_port()}"},
            },
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "log": {"level": "warning", "format": "json"},
        }
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def reconfigure(self, **sections: Any) -> None:
        """Replace top-level sections of the config (the ports and the data dir stay); the
        service reads it at its next start."""
        self.config = {**self.config, **sections}
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the service is not running")
        return self.proc.pid

    def command(self, *args: str) -> list[str]:
        """A `python -m pathwatch` command line for this service's config, pinned."""
        return pinned(
            self.cpu, [sys.executable, "-m", "pathwatch", *args, "--config", str(self.config_path)]
        )

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait for /readyz 200. Returns seconds from exec to ready.

        Raises RuntimeError (with the log's tail) when it exits or is not ready in `timeout`.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the service is already running")
        with open(self.log_path, "ab") as log:
            started = time.monotonic()
            self.proc = subprocess.Popen(
                self.command("serve"),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
                start_new_session=True,  # a Ctrl-C on the bench reaches it only through us
            )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pathwatch exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                status, _ = self.api("GET", "/readyz", timeout=1.0)
            except OSError:
                status = 0
            if status == 200:
                return time.monotonic() - started
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"pathwatch was not ready within {timeout:.0f} s:\n{self.tail()}")

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM and wait (kill -9 after `timeout`). Returns the seconds the shutdown took."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"pathwatch did not stop within {timeout:.0f} s") from None
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def api(self, method: str, path: str, timeout: float = 60.0) -> tuple[int, bytes]:
        """One admin HTTP request: (status, body). Raises OSError when it cannot connect."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metrics(self) -> dict[str, float]:
        """The Prometheus exposition as {series: value} (series with their labels)."""
        status, body = self.api("GET", "/metrics", timeout=10.0)
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}")
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                out[series] = float(value)
        return out

    def evaluate(self, at: str, dry_run: bool = False) -> tuple[int, dict[str, Any], int]:
        """POST the parity rule's evaluate endpoint at `at` (RFC 3339), a dry run if asked
        (the same evaluation under the same lock, nothing recorded).

        Returns (status, JSON body, body size in bytes).
        """
        query = f"at={at}&dry_run=true" if dry_run else f"at={at}"
        status, body = self.api("POST", f"/api/v1/rules/{RULE}/evaluate?{query}", timeout=300.0)
        parsed: dict[str, Any] = json.loads(body) if body.startswith(b"{") else {}
        return status, parsed, len(body)

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def metric_value(metrics: dict[str, float], name: str, **labels: str) -> float:
    """The value of series `name` with exactly `labels` (0.0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for series, value in metrics.items():
        m = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", series)
        if m is None or m.group(1) != name:
            continue
        have = ",".join(sorted(p for p in (m.group(2) or "").split(",") if p))
        if have == want:
            return value
    return 0.0
