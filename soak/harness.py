"""Soak: one run of the harness, phase by phase.

Start the webhook receiver and the service, start the senders, then until the deadline:
kill -9 at random moments (now and then twice, the second during recovery) and restart;
checkpoints that quiesce the senders and evaluate the next past hourly ticks through the API,
oldest first (now and then with a kill -9 during the evaluation, after which the same tick is
asked again); at every top of the hour, a quiesced checkpoint around the scheduler's own tick.
Each tick's alerts are compared with the model's. At the end: the remaining hours, one final
tick at the latest minute (it settles every late onset), every alert delivered, a clean stop,
and every acknowledged minute looked up in the stopped data dir.

Ticks always run in time order (past ticks stop at the first scheduler tick): that is the
order the scheduler keeps, and the order in which late data is settled as documented.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import os
import random
import statistics
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from soak.fleet import Fleet, FleetShape
from soak.model import RULE, Alert, Model, PresenceCheck, alert_of, iso_minute
from soak.otlp import Key
from soak.senders import Endpoint, Gate, Sender
from soak.service import ServiceFailed, ServiceProcess, dir_size
from soak.settings import Settings
from soak.webhook import WebhookReceiver

HOUR_S = 3600
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_KEY_FIELDS = (
    "host.name",
    "k8s.cluster.name",
    "k8s.node.name",
    "process.pid",
    "process.executable.path",
    "process.executable.name",
)


class HarnessError(RuntimeError):
    """The harness could not go on (the service would not start, a request kept failing)."""


@dataclass
class TickResult:
    minute: int
    kind: str  # past, scheduler, final
    alerts: int
    late: int
    new: bool  # evaluated by this request (False: recorded before, by the scheduler or a retry)
    missing: list[Alert]
    unexpected: list[Alert]
    skipped: int


@dataclass
class Samples:
    rss_max: int = 0
    hwm_max: int = 0
    rss_last: int = 0
    disk_first: int = 0
    disk_max: int = 0
    disk_last: int = 0


@dataclass
class Outcome:
    """Everything the report needs."""

    seed: int
    settings: Settings
    started_wall: float = 0.0
    seconds: float = 0.0
    first_start_s: float = 0.0
    restart_s: list[float] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)  # monotonic times
    kills_by_moment: Counter[str] = field(default_factory=Counter)
    ticks: list[TickResult] = field(default_factory=list)
    past_skipped: int = 0
    scheduler_late: list[str] = field(default_factory=list)
    quiesce_timeouts: int = 0
    evaluations_cut: int = 0  # kill -9 before the evaluate request was answered
    cut_but_recorded: int = 0  # of those, the tick was committed before the kill
    unexpected_exits: int = 0
    samples: Samples = field(default_factory=Samples)
    expected_ids: set[str] = field(default_factory=set)
    delivered: dict[str, list[float]] = field(default_factory=dict)
    webhook_requests: int = 0
    webhook_503: int = 0
    bad_signatures: int = 0
    deadletters: int = 0
    stop_s: float = 0.0
    disk_after_stop: int = 0
    presence: PresenceCheck | None = None
    error_lines: list[str] = field(default_factory=list)
    error_line_count: int = 0


class Soak:
    def __init__(self, settings: Settings, seed: int, workdir: Path) -> None:
        self.settings = settings
        self.rng = random.Random(seed)
        self.out = Outcome(seed, settings)
        self.model = Model()
        self.endpoint = Endpoint()
        self.gate = Gate()
        self.stop = threading.Event()
        self.abandon = threading.Event()
        secret = bytes(self.rng.getrandbits(8) for _ in range(32))
        self.receiver = WebhookReceiver(secret, settings.sink_failure_rate, seed + 1)
        self.service = ServiceProcess(workdir, self._config(workdir, secret))
        self.senders: list[Sender] = []
        self._kill_lock = threading.Lock()
        self._sampler: threading.Thread | None = None
        self._sampling_done = threading.Event()
        self._started = time.monotonic()
        self._next_progress = 0.0
        self._first_start_ms = 0
        self._past: list[int] = []

    def _config(self, workdir: Path, secret: bytes) -> dict[str, Any]:
        loopback = "127.0.0.1:0"
        return {
            "data_dir": str(workdir / "data"),
            "receiver": {
                "grpc": {"listen": loopback},
                "http": {"listen": loopback},
                # History is sent out of order on purpose: trust every timestamp, as the
                # reference search does, so that the model needs no trust rule.
                "max_baseline_lateness": "0s",
            },
            "http": {"listen": loopback},
            "store": {"fsync": self.settings.fsync},
            # The harness's single loopback sender stands for a whole fleet behind a gateway;
            # every alert is delivered one by one so that each id can be counted.
            "limits": {
                "new_keys_per_host_per_hour": 0,
                "new_keys_per_sender_per_hour": 0,
                "new_keys_per_hour": 0,
                "max_alerts_per_tick": 0,
            },
            "log": {"level": "info", "format": "json"},
            # delay 0s: any past tick can be evaluated through the API, and the scheduler
            # runs the top of the hour at once (the harness quiesces around it).
            # no_baseline alert: the model is the reference rule, which alerts every key of a
            # cluster without history (the service's default summarises them).
            "rules": [{"id": RULE, "delay": "0s", "no_baseline": "alert"}],
            "sinks": [
                {
                    "name": "soak",
                    "type": "webhook",
                    "url": self.receiver.url,
                    "secret": "whsec_" + base64.b64encode(secret).decode(),
                    "retry": {"initial_backoff": "1s", "max_backoff": "5s"},
                }
            ],
        }

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> Outcome:
        s = self.settings
        self.out.started_wall = time.time()
        self.out.first_start_s = self.service.start()
        self.endpoint.set(self.service.grpc_port)
        self._first_start_ms = self._first_start()
        self.out.samples.disk_first = dir_size(self.service.data_dir)
        self._say(
            "start",
            f"pathwatch ready in {self.out.first_start_s:.2f} s (pid {self.service.pid}); "
            f"{s.senders} senders x {s.hosts} hosts x {s.processes} processes; webhook "
            f"{self.receiver.url}",
        )
        first_hour = self._first_start_ms // 3_600_000 * 3_600_000
        self._past = [
            (first_hour - h * 3_600_000) // 60_000
            for h in range(s.past_hours, -1, -1)
            if first_hour - h * 3_600_000 < self._first_start_ms - 60_000
        ]
        self._sampler = threading.Thread(target=self._sample, name="soak-sampler", daemon=True)
        self._sampler.start()
        # The oldest history stays inside pathwatch's horizon (31 d + 1 h) until the end.
        oldest_days = min(30.9, 31 + 1 / 24 - (s.duration_s + HOUR_S) / 86400)
        shape = FleetShape(
            s.hosts, s.processes, s.churn, s.host_churn, s.history_rate, max(3.0, oldest_days)
        )
        now_ms = time.time_ns() // 1_000_000
        for i in range(s.senders):
            fleet = Fleet(i, shape, random.Random(self.rng.random()), now_ms)
            sender = Sender(
                fleet, self.endpoint, self.gate, self.model, s.interval_s, self.stop, self.abandon
            )
            self.senders.append(sender)
            sender.start()
        self._main_loop(time.time() + s.duration_s)
        self._finish()
        self.out.seconds = time.monotonic() - self._started
        return self.out

    def close(self) -> None:
        """Stop senders, sampler, service and receiver; bounded, safe after any failure."""
        self.stop.set()
        self.abandon.set()
        self._sampling_done.set()
        self.gate.open()
        for sender in self.senders:
            sender.join(20)
        self.service.kill()
        self.receiver.close()
        if self._sampler is not None:
            self._sampler.join(5)

    def _first_start(self) -> int:
        _, body = self._api("GET", "/api/v1/rules")
        rule = next(r for r in body["rules"] if r["id"] == RULE)
        return _ms(rule["baseline"]["first_start"])

    def _main_loop(self, end: float) -> None:
        s = self.settings
        now = time.time()
        next_kill = now + self._kill_gap()
        next_checkpoint = now + s.checkpoint_every_s * self.rng.uniform(0.5, 1.0)
        while True:
            now = time.time()
            if now >= end:
                return
            hour = (math.floor(now / HOUR_S) + 1) * HOUR_S
            hour_checkpoint = hour - 10
            self._check_health()
            if now >= hour_checkpoint:
                self._hour_checkpoint(hour)
                next_checkpoint = max(next_checkpoint, time.time() + 5)
                next_kill = max(next_kill, time.time() + 5)
                continue
            if now >= next_checkpoint:
                self._past_checkpoint(end, hour_checkpoint)
                next_checkpoint = time.time() + s.checkpoint_every_s * self.rng.uniform(0.5, 1.5)
                continue
            if now >= next_kill:
                if hour_checkpoint - now > 30:  # never near the scheduler's tick
                    self._kill("ingest")
                    self._restart(recovery_kill=self.rng.random() < 0.15)
                next_kill = time.time() + self._kill_gap()
                continue
            self._progress()
            time.sleep(max(0.0, min(0.25, end - now, next_kill - now, next_checkpoint - now)))

    def _kill_gap(self) -> float:
        every = self.settings.kill_every_s
        return self.rng.expovariate(1 / every) if every > 0 else float("inf")

    def _check_health(self) -> None:
        for sender in self.senders:
            if sender.error is not None:
                raise HarnessError(f"{sender.name} failed: {sender.error!r}")
        if not self.service.alive():
            with self._kill_lock:
                code = self.service.proc.returncode if self.service.proc else None
            self.out.unexpected_exits += 1
            self._say(
                "service", f"EXITED BY ITSELF with {code}; restarting:\n{self.service.tail()}"
            )
            self.endpoint.set(0)
            self._restart()

    # -- kill -9 and restart -------------------------------------------------------------------

    def _kill(self, moment: str) -> None:
        with self._kill_lock:
            if not self.service.alive():
                return
            self.endpoint.set(0)
            self.service.kill()
            self.out.kills.append(time.monotonic())
            self.out.kills_by_moment[moment] += 1

    def _restart(self, recovery_kill: bool = False) -> None:
        if recovery_kill:
            timer = threading.Timer(self.rng.uniform(0.05, 1.0), self._kill, args=("recovery",))
            timer.start()
            with contextlib.suppress(ServiceFailed):
                self.service.start()
            timer.join()
            self._kill("recovery")  # when it was ready before the timer fired
        try:
            seconds = self.service.start()
        except ServiceFailed as exc:
            raise HarnessError(f"pathwatch did not restart: {exc}") from None
        self.out.restart_s.append(seconds)
        self.endpoint.set(self.service.grpc_port)
        self._say("kill -9", f"#{len(self.out.kills)}: ready again in {seconds:.2f} s "
                  f"(pid {self.service.pid})")  # fmt: skip

    # -- checkpoints ---------------------------------------------------------------------------

    def _quiesce(self) -> bool:
        self.gate.close()
        if self.gate.wait_idle(90):
            return True
        self.out.quiesce_timeouts += 1
        self._say("quiesce", "exports still unacknowledged after 90 s: checkpoint skipped")
        self.gate.open()
        return False

    def _past_checkpoint(self, end: float, limit: float) -> None:
        if not self._past:
            return
        left = max(1, int((min(end, limit) - time.time()) / self.settings.checkpoint_every_s))
        count = math.ceil(len(self._past) / left)
        ticks, self._past = self._past[:count], self._past[count:]
        if not self._quiesce():
            self._past = ticks + self._past
            return
        try:
            doomed = self.rng.choice(ticks) if self.rng.random() < 0.5 else None
            for tick in ticks:
                self._tick(tick, "past", kill=tick == doomed)
        finally:
            self.gate.open()

    def _hour_checkpoint(self, hour: float) -> None:
        tick = int(hour) // 60
        if tick in self.model.recorded:
            return
        if self._past:
            self.out.past_skipped += len(self._past)
            self._past = []  # a past tick after the scheduler's would run out of order
        if not self._quiesce():
            return
        try:
            time.sleep(max(0.0, hour - time.time() + 0.2))
            self._await_scheduler(tick)
            self._tick(tick, "scheduler")
        finally:
            self.gate.open()

    def _await_scheduler(self, tick: int, timeout: float = 60.0) -> None:
        """Wait until the service's own scheduler recorded `tick` (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, body = self._api("GET", "/api/v1/rules")
            rule = next(r for r in body["rules"] if r["id"] == RULE)
            last = rule.get("last_tick")
            if last and _ms(last["time"]) // 60_000 >= tick:
                return
            time.sleep(0.5)
        self.out.scheduler_late.append(iso_minute(tick))
        self._say("scheduler", f"did not run {iso_minute(tick)} within {timeout:.0f} s")

    def _tick(self, tick: int, kind: str, kill: bool = False) -> None:
        """Evaluate (or fetch) one tick and compare it with the model. Senders are quiesced."""
        expected = self.model.expect(tick)
        body = self._evaluate(tick, kill)
        actual = [alert_of(b) for b in body["alerts"]]
        comparison = self.model.compare(expected, actual)
        self.model.apply(tick, actual)
        result = TickResult(
            tick,
            kind,
            len(actual),
            sum(1 for a in actual if a.late),
            bool(body.get("new")),
            comparison.missing,
            comparison.unexpected,
            comparison.skipped,
        )
        self.out.ticks.append(result)
        verdict = "ok" if not (result.missing or result.unexpected) else "MISMATCH"
        self._say(
            "tick",
            f"{kind} {iso_minute(tick)}: {result.alerts} alerts ({result.late} late), "
            f"{'evaluated' if result.new else 'recorded before'}; {verdict}",
        )
        for label, alerts in (("missing", result.missing), ("unexpected", result.unexpected)):
            for alert in alerts[:5]:
                self._say("tick", f"  {label}: {alert.describe()}")

    def _evaluate(self, tick: int, kill: bool) -> dict[str, Any]:
        """POST evaluate; after a kill -9 during it, restart and ask again (same answer due)."""
        path = f"/api/v1/rules/{RULE}/evaluate?at={iso_minute(tick)}"
        for attempt in range(5):
            timer = None
            if kill and attempt == 0:
                timer = threading.Timer(self.rng.uniform(0.0, 0.05), self._kill, ("evaluation",))
                timer.start()
            try:
                status, body = self.service.api("POST", path, timeout=300)
            except (OSError, http.client.HTTPException) as exc:
                status, body = 0, repr(exc)
            finally:
                if timer is not None:
                    timer.join()
            if not self.service.alive():
                if timer is None:
                    self.out.unexpected_exits += 1
                elif status == 0:
                    self.out.evaluations_cut += 1  # killed before it answered
                self._restart()
            if status == 200:
                result: dict[str, Any] = body
                if attempt > 0 and not result.get("new"):
                    self.out.cut_but_recorded += 1
                return result
            if status != 0:
                break
        raise HarnessError(f"POST {path} answered {status}: {body}")

    def _api(self, method: str, path: str) -> tuple[int, Any]:
        status, body = self.service.api(method, path, timeout=60)
        if status != 200:
            raise HarnessError(f"{method} {path} answered {status}: {body}")
        return status, body

    # -- the end -------------------------------------------------------------------------------

    def _finish(self) -> None:
        self._say("finish", "stopping the senders (in-flight exports retried until acknowledged)")
        self.gate.close()
        if not self.gate.wait_idle(90):
            self.abandon.set()
            self.gate.wait_idle(30)
        self.stop.set()
        for sender in self.senders:
            sender.join(30)
        self._check_health()
        self._settle_hours()
        final = int(time.time()) // 60
        if final not in self.model.recorded:
            self._tick(final, "final", kill=self.rng.random() < 0.5)
        self._await_deliveries()
        to_hour = HOUR_S - time.time() % HOUR_S
        if to_hour < 30:  # the scheduler's tick is due: compare it here, not lose it in the stop
            self._say("finish", f"waiting {to_hour:.0f} s for the scheduler's top of the hour")
            time.sleep(to_hour + 0.5)
        if self._settle_hours():
            self._await_deliveries()
        self._check_health()
        _, body = self._api("GET", "/api/v1/deadletters")
        self.out.deadletters = len(body["deadletters"])
        self.out.delivered = self.receiver.delivered()
        self.out.webhook_requests = self.receiver.requests
        self.out.webhook_503 = self.receiver.failed
        self.out.bad_signatures = self.receiver.bad_signatures
        self.out.expected_ids = set(self.model.alerts)
        self._sampling_done.set()
        if self._sampler is not None:
            self._sampler.join(10)
        self._say("finish", "clean stop (SIGTERM)")
        try:
            self.out.stop_s = self.service.stop()
        except ServiceFailed as exc:
            raise HarnessError(str(exc)) from None
        self.out.disk_after_stop = dir_size(self.service.data_dir)
        self._say("finish", "reading every stored key (pathwatch inspect on the stopped data dir)")
        self.out.presence = self.model.check_presence(self._inspect())
        self._scan_log()

    def _settle_hours(self) -> bool:
        """Fetch (and compare) every top of the hour since the first start not seen yet."""
        done = False
        hour = (self._first_start_ms // 3_600_000 + 1) * 3_600_000
        while hour <= time.time() * 1000:
            tick = hour // 60_000
            if tick not in self.model.recorded:
                self._await_scheduler(tick)
                self._tick(tick, "scheduler")
                done = True
            hour += 3_600_000
        return done

    def _await_deliveries(self, timeout: float = 300.0) -> None:
        expected = set(self.model.alerts)
        deadline = time.monotonic() + timeout
        next_say = 0.0
        while True:
            missing = expected - self.receiver.delivered().keys()
            if not missing:
                self._say("deliver", f"all {len(expected):,} alert ids delivered")
                return
            if time.monotonic() > deadline:
                self._say("deliver", f"{len(missing):,} alert ids still undelivered after "
                          f"{timeout:.0f} s")  # fmt: skip
                return
            if time.monotonic() >= next_say:
                self._say("deliver", f"waiting for {len(missing):,} of {len(expected):,} ids")
                next_say = time.monotonic() + 10
            time.sleep(0.25)

    def _inspect(self) -> dict[Key, tuple[int, set[int]]]:
        """Every stored key of the rule: (first seen in ms, minutes present)."""
        proc = subprocess.run(
            self.service.command("inspect", "--rule", RULE, "--limit", str(10**9)),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("PATHWATCH_")},
        )
        if proc.returncode != 0:
            raise HarnessError(f"pathwatch inspect failed ({proc.returncode}): {proc.stderr}")
        stored: dict[Key, tuple[int, set[int]]] = {}
        for line in proc.stdout.splitlines():
            view = json.loads(line)
            key: Key = tuple(view["key"][f] for f in _KEY_FIELDS)  # type: ignore[assignment]
            minutes: set[int] = set()
            for start, end in view["presence"]:
                minutes.update(range(_ms(start) // 60_000, _ms(end) // 60_000))
            stored[key] = (_ms(view["first_seen"]), minutes)
        return stored

    def _scan_log(self) -> None:
        """Count error lines the service logged over all its runs (reported, not judged)."""
        seen: Counter[str] = Counter()
        try:
            lines = self.service.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return
        for line in lines:
            if '"level": "error"' in line or '"level": "critical"' in line:
                try:
                    seen[json.loads(line).get("event", line[:120])] += 1
                except ValueError:
                    seen[line[:120]] += 1
        self.out.error_line_count = sum(seen.values())
        self.out.error_lines = [f"{n} x {event}" for event, n in seen.most_common(5)]

    # -- sampling and progress -----------------------------------------------------------------

    def _sample(self) -> None:
        """Every second RSS, every 5 s the data dir, until the clean stop (a last reading)."""
        samples = self.out.samples
        next_disk = 0.0
        while True:
            done = self._sampling_done.wait(1.0)
            memory = self.service.memory()
            if memory is not None:
                samples.rss_last = memory[0]
                samples.rss_max = max(samples.rss_max, memory[0])
                samples.hwm_max = max(samples.hwm_max, memory[1])
            if done or time.monotonic() >= next_disk:
                samples.disk_last = dir_size(self.service.data_dir)
                samples.disk_max = max(samples.disk_max, samples.disk_last)
                next_disk = time.monotonic() + 5
            if done:
                return

    def _progress(self) -> None:
        if time.monotonic() < self._next_progress:
            return
        self._next_progress = time.monotonic() + 10
        exports = sum(s.stats.exports for s in self.senders)
        failed = sum(sum(s.stats.failed_attempts.values()) for s in self.senders)
        wrong = sum(len(t.missing) + len(t.unexpected) for t in self.out.ticks)
        sm = self.out.samples
        self._say(
            "progress",
            f"{exports:,} exports acked ({failed:,} attempts failed), "
            f"{self.model.observations:,} observations of {len(self.model.minutes):,} keys; "
            f"{len(self.out.kills)} kills; {len(self.out.ticks)} ticks, "
            f"{len(self.model.alerts):,} alerts, {self.receiver.count():,} delivered, "
            f"{wrong} wrong; RSS {sm.rss_last / 1e6:.0f} MB, data dir {sm.disk_last / 1e6:.1f} MB",
        )

    def _say(self, phase: str, message: str) -> None:
        elapsed = time.monotonic() - self._started
        print(f"[{int(elapsed) // 60:3d}:{elapsed % 60:04.1f}] {phase:<9} {message}", flush=True)


def _ms(text: str) -> int:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
