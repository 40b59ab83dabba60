"""ServiceProcess: `python -m pathwatch serve` on one data dir, started, killed and restarted.

Every listener binds 127.0.0.1:0; the ports of each run are read from its JSON log lines
(`"otlp grpc receiver listening"` and `"admin http listening"` carry `"port"`). Its output goes
to a log file in the work dir. Every wait is bounded; `kill` is safe at any time and twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

import yaml


class ServiceFailed(RuntimeError):
    """The service exited, or did not start or stop in time."""


class ServiceProcess:
    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.data_dir = Path(config["data_dir"])
        self.config_path = workdir / "pathwatch.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "pathwatch.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.runs = 0
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pathwatch", *args, "--config", str(self.config_path)]

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait for /readyz 200; returns the seconds from exec to ready.

        Raises ServiceFailed (with the log's tail) when it exits or is not ready in time.
        """
        if self.alive():
            raise ServiceFailed("the service is already running")
        self.runs += 1
        self.grpc_port = self.http_port = 0
        env = {k: v for k, v in os.environ.items() if not k.startswith("PATHWATCH_")}
        ports: queue.Queue[tuple[str, int]] = queue.Queue()
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed by the pump thread)
        log.write(f"--- soak: start {self.runs} ---\n".encode())
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command("serve"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C on the harness reaches it only through us
        )
        assert self.proc.stdout is not None
        self._pump = threading.Thread(
            target=_pump, args=(self.proc.stdout, log, ports), name="soak-log", daemon=True
        )
        self._pump.start()
        deadline = started + timeout
        while not (self.grpc_port and self.http_port):
            try:
                event, port = ports.get(timeout=max(0.01, min(0.2, deadline - time.monotonic())))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise ServiceFailed(self._exited()) from None
                if time.monotonic() > deadline:
                    self.kill()
                    raise ServiceFailed(f"no listening ports within {timeout:.0f} s") from None
                continue
            if event == "grpc":
                self.grpc_port = port
            elif event == "http":
                self.http_port = port
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceFailed(self._exited())
            try:
                status, _ = self.api("GET", "/readyz", timeout=2.0)
            except OSError:
                status = 0
            if status == 200:
                return time.monotonic() - started
            time.sleep(0.02)
        self.kill()
        raise ServiceFailed(f"not ready within {timeout:.0f} s:\n{self.tail()}")

    def _exited(self) -> str:
        assert self.proc is not None
        if self._pump is not None:
            self._pump.join(5)
        return f"pathwatch exited with {self.proc.returncode}:\n{self.tail()}"

    def kill(self) -> None:
        """kill -9: nothing is flushed or closed."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        if self._pump is not None:
            self._pump.join(5)

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM and wait; returns the seconds the shutdown took. Raises ServiceFailed (after
        kill -9) when it takes longer than `timeout` or exits with an error."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return 0.0
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ServiceFailed(f"did not stop within {timeout:.0f} s of SIGTERM") from None
        if self._pump is not None:
            self._pump.join(5)
        if code != 0:
            raise ServiceFailed(f"exited with {code} after SIGTERM:\n{self.tail()}")
        return time.monotonic() - started

    def api(self, method: str, path: str, timeout: float = 60.0) -> tuple[int, Any]:
        """One admin API request: (status, parsed JSON or text). OSError when unreachable."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        if body[:1] in (b"{", b"["):
            return status, json.loads(body)
        return status, body.decode(errors="replace")

    def memory(self) -> tuple[int, int] | None:
        """(VmRSS, VmHWM) in bytes of the running service, None when it is not running."""
        pid = self.pid
        if pid is None:
            return None
        values = {}
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        name, amount, _unit = line.split()
                        values[name[:-1]] = int(amount) * 1024
        except OSError:
            return None
        return values.get("VmRSS", 0), values.get("VmHWM", 0)

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _pump(stream: IO[bytes], log: IO[bytes], ports: queue.Queue[tuple[str, int]]) -> None:
    """Copy the service's output to the log file; report its listening ports."""
    with log:
        for line in stream:
            log.write(line)
            if b"listening" not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "otlp grpc receiver listening":
                ports.put(("grpc", int(event["port"])))
            elif event.get("event") == "admin http listening":
                ports.put(("http", int(event["port"])))
        log.flush()


def dir_size(path: Path) -> int:
    """Bytes of every file under `path` (files that vanish meanwhile are skipped)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total
