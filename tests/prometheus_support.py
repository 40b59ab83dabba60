"""A real Prometheus server (Debian's `prometheus`, installed by .ci/run) for integration tests:
on an ephemeral loopback port, with its TSDB in a temp dir, scraping the given targets."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support import wait_until

PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """`prometheus` scraping `targets` (job name -> host:port) every `scrape_interval`.

    Use as a context manager: the server is stopped (and killed if it does not stop) on exit,
    whether the test passed or not.
    """

    def __init__(self, workdir: Path, targets: dict[str, str], scrape_interval: str = "1s") -> None:
        assert PROMETHEUS is not None, "the prometheus Debian package is installed by .ci/run"
        self.workdir = workdir
        self.targets = targets
        self.scrape_interval = scrape_interval
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            for job, target in self.targets.items()
        )
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(
            f"global:\n  scrape_interval: {self.scrape_interval}\n"
            f"  scrape_timeout: {self.scrape_interval}\nscrape_configs:\n{jobs}"
        )
        self.port = free_port()
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(self._ready, timeout=timeout, interval=0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def api(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """The whole answer of `/api/v1/query` (status, data or errorType and error), also for
        a query Prometheus refuses (HTTP 400/422 with a JSON body)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.base}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
        answer: dict[str, Any] = json.loads(body)
        return answer

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The result of a query that must be valid; [] while Prometheus is not answering."""
        try:
            answer = self.api(expr, at)
        except OSError:
            return []
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def wait_for_scrapes(self, job: str, count: int, after: float, timeout: float = 30.0) -> float:
        """Waits until `job` was scraped successfully `count` times after the Unix time `after`;
        returns the time of the last of them."""
        seen: set[float] = set()

        def scraped() -> bool:
            # timestamp() of a plain selector is the sample's (scrape's) time; of anything
            # computed, such as `up == 1`, it would be the evaluation time.
            for series in self.query(f'timestamp(up{{job="{job}"}})'):
                t = float(series["value"][1])
                if t > after and self.query(f'up{{job="{job}"}} == 1', t):
                    seen.add(t)
            return len(seen) >= count

        wait_until(scraped, timeout=timeout, interval=0.2)
        return max(seen)
