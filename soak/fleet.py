"""The simulated fleet one sender owns: hosts whose processes churn, hosts that come and go,
and history exports stamped minutes to weeks in the past (a collector's queue draining late).

Pure and seeded: `Fleet.round(now_ms)` returns the exports of one scrape round. Each sender
owns its hosts, so no key is ever written by two senders.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms

from soak.otlp import POINTS_PER_RESOURCE, Key, Process, scrape_request

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

COMMON_PATHS = (
    "/usr/bin/containerd",
    "/usr/bin/containerd-shim-runc-v2",
    "/usr/bin/kubelet",
    "/usr/local/bin/kube-proxy",
    "/usr/sbin/sshd",
    "/usr/bin/python3",
    "/usr/lib/systemd/systemd-journald",
    "/usr/bin/bash",
    "/pause",
    "/coredns",
    "/usr/local/bin/node",
    "/usr/bin/java",
    "/usr/sbin/chronyd",
    "/usr/local/bin/envoy",
    "/bin/sh",
)
KERNEL_THREADS = ("kthreadd", "kworker/0:1", "ksoftirqd/0", "rcu_sched")


@dataclass
class Export:
    """One Export call and what it observes: key -> (earliest point in ms, minutes)."""

    request: ms.ExportMetricsServiceRequest
    observations: dict[Key, tuple[int, set[int]]]
    resources: int
    points: int
    history: bool  # stamped in the past (out of order), not a live scrape
    untracked_points: int  # of resources without a key (kernel threads): partial_success


@dataclass
class Host:
    name: str
    cluster: str
    live: dict[int, Process] = field(default_factory=dict)
    dead: list[Process] = field(default_factory=list)
    ghosts: list[Process] = field(default_factory=list)  # processes only history knows
    next_pid: int = 1000


@dataclass(frozen=True)
class FleetShape:
    hosts: int = 5
    processes: int = 40
    churn: float = 0.01  # share of a host's processes replaced per round
    host_churn: float = 0.01  # chance per round that one host leaves and a new one joins
    history_rate: float = 0.15  # chance per host and round of a history export
    # pathwatch refuses points older than 31 d + 1 h and trims minutes past that horizon
    max_history_days: float = 30.9


class Fleet:
    def __init__(self, index: int, shape: FleetShape, rng: random.Random, now_ms: int) -> None:
        self.index = index
        self.shape = shape
        self.rng = rng
        self.cluster = f"soak-{index % 2}"
        self._hosts_made = 0
        self.hosts = [self._new_host(now_ms) for _ in range(shape.hosts)]
        self.retired: list[Host] = []

    # -- the fleet changing ---------------------------------------------------------------

    def _new_host(self, now_ms: int) -> Host:
        self._hosts_made += 1
        host = Host(f"s{self.index}-node-{self._hosts_made:03d}", self.cluster)
        host.next_pid = self.rng.randrange(300, 5000)
        for name in KERNEL_THREADS:
            self._spawn(host, now_ms, path="", name=name)
        for _ in range(self.shape.processes):
            self._spawn(host, now_ms)
        return host

    def _path(self) -> str:
        r = self.rng.random()
        if r < 0.9:
            return self.rng.choice(COMMON_PATHS)
        if r < 0.95:
            return f"/tmp/.cache/{self.rng.getrandbits(24):06x}/kworkerd"
        return f"/opt/app-{self.rng.randrange(50)}/bin/server"

    def _spawn(
        self, host: Host, now_ms: int, path: str | None = None, name: str | None = None
    ) -> Process:
        host.next_pid += self.rng.randrange(1, 40)
        path = self._path() if path is None else path
        proc = Process(
            host.name,
            host.cluster,
            host.next_pid,
            path,
            name or path.rsplit("/", 1)[-1],
            now_ms - self.rng.randrange(0, HOUR_MS),
        )
        host.live[proc.pid] = proc
        return proc

    def _churn(self, now_ms: int) -> None:
        for host in self.hosts:
            for pid, proc in list(host.live.items()):
                if proc.path and self.rng.random() < self.shape.churn:
                    del host.live[pid]
                    host.dead.append(proc)
            del host.dead[:-200]
            while sum(1 for p in host.live.values() if p.path) < self.shape.processes:
                self._spawn(host, now_ms)
        if self.rng.random() < self.shape.host_churn:
            gone = self.hosts.pop(self.rng.randrange(len(self.hosts)))
            self.retired.append(gone)
            del self.retired[:-10]
            self.hosts.append(self._new_host(now_ms))

    # -- exports ----------------------------------------------------------------------------

    def round(self, now_ms: int) -> list[Export]:
        """The exports of one scrape round at `now_ms`: each live host's scrape (one to three
        hosts per request, as a gateway batches), then history exports; then churn."""
        out: list[Export] = []
        hosts = list(self.hosts)
        while hosts:
            n = self.rng.randint(1, 3)
            take, hosts = hosts[:n], hosts[n:]
            out.append(self._export([(now_ms, list(h.live.values())) for h in take], False))
        for host in self.hosts:
            if self.rng.random() < self.shape.history_rate:
                out.append(self._history(host, now_ms))
        if self.retired and self.rng.random() < self.shape.history_rate / 4:
            out.append(self._history(self.rng.choice(self.retired), now_ms))
        self._churn(now_ms)
        return out

    def _history(self, host: Host, now_ms: int) -> Export:
        """Points stamped in the past: some of the host's live and dead processes and some
        only history knows, at one to three consecutive scrape times; or a boundary case."""
        rng = self.rng
        band = rng.random()
        if band < 0.2:
            return self._edge(host, now_ms)
        if band < 0.45:  # the last hours: windows of the ticks still to come
            when = now_ms - rng.randrange(MINUTE_MS, 3 * HOUR_MS)
        elif band < 0.75:  # windows of the past ticks the harness evaluates
            when = now_ms - rng.randrange(3 * HOUR_MS, 50 * HOUR_MS)
        else:  # baselines only, up to the oldest minute pathwatch accepts
            when = now_ms - rng.randrange(50 * HOUR_MS, int(self.shape.max_history_days * DAY_MS))
        procs: list[Process] = []
        live = [p for p in host.live.values() if p.path]
        procs += rng.sample(live, min(len(live), rng.randrange(0, 12)))
        procs += rng.sample(host.dead, min(len(host.dead), rng.randrange(0, 6)))
        if host.ghosts and rng.random() < 0.6:
            procs += rng.sample(host.ghosts, min(len(host.ghosts), rng.randrange(1, 6)))
        procs += self._ghosts(host, when, rng.randrange(0, 8))
        if rng.random() < 0.2:
            procs.append(next(p for p in host.live.values() if not p.path))
        scrapes = [(when + i * MINUTE_MS, procs) for i in range(rng.randint(1, 3))]
        return self._export(scrapes, True)

    def _ghosts(self, host: Host, when: int, count: int) -> list[Process]:
        """New processes that only history knows (later history exports may reuse them)."""
        out = []
        for _ in range(count):
            path = self._path()
            pid = self.rng.randrange(100_000, 4_000_000)
            started = when - self.rng.randrange(0, HOUR_MS)
            name = path.rsplit("/", 1)[-1]
            out.append(Process(host.name, host.cluster, pid, path, name, started))
        host.ghosts += out
        del host.ghosts[:-300]
        return out

    def _edge(self, host: Host, now_ms: int) -> Export:
        """New keys whose newness at an hourly tick T of the last two days hangs on one
        minute: seen in T's window (its first minute, its last, or between) and, or not, at
        an edge of its baseline (T - 30 d, the baseline's first minute; the minute before it,
        outside; T - 61 min, the baseline's last minute); or seen at T itself, outside."""
        rng = self.rng
        inside = rng.choice((60, 1, 30))
        edge = rng.choice((30 * 24 * 60, 30 * 24 * 60 + 1, 61, 0, None))
        back = 12 if edge is not None and edge > 61 else 48  # 30 d + 12 h: inside the horizon
        tick = now_ms // HOUR_MS * HOUR_MS - rng.randrange(1, back) * HOUR_MS
        times = [tick - m * MINUTE_MS + rng.randrange(0, MINUTE_MS) for m in (inside, edge)
                 if m is not None]  # fmt: skip
        procs = self._ghosts(host, min(times), rng.randint(2, 6))
        return self._export([(t, procs) for t in times], True)

    @staticmethod
    def _export(scrapes: list[tuple[int, list[Process]]], history: bool) -> Export:
        observations: dict[Key, tuple[int, set[int]]] = {}
        resources = untracked = 0
        for time_ms, procs in scrapes:
            resources += len(procs)
            for p in procs:
                key = p.key
                if key is None:
                    untracked += 1
                    continue
                first, minutes = observations.get(key, (time_ms, set()))
                minutes.add(time_ms // MINUTE_MS)
                observations[key] = (min(first, time_ms), minutes)
        return Export(
            scrape_request(scrapes),
            observations,
            resources,
            resources * POINTS_PER_RESOURCE,
            history,
            untracked * POINTS_PER_RESOURCE,
        )
