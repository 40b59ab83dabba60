"""Supervisor: runs every long-lived loop on its own thread and brings it back when it dies.

A loop that raises is logged with its stack, counted in
``pathwatch_component_failures_total{component}`` and restarted after a backoff that doubles up
to `max_backoff_s` (reset once the loop has run for `healthy_after_s`). After `max_failures`
failures in a row without such a healthy run, the component is given up: `failed` names it, and
the service answers /readyz (and, for a component whose cure is a restart of the pod, /healthz)
with 503. A loop that returns has stopped on purpose (shutdown).

The loop receives the stop event and must return soon after it is set; backoffs wait on it, so
shutdown interrupts them. `on_failure` runs after each failure, before the backoff: the place to
answer whatever the dead loop left waiting (pending Exports get UNAVAILABLE, not a timeout).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="supervisor")

Loop = Callable[[threading.Event], None]


@dataclass(slots=True)
class _Component:
    name: str
    loop: Loop
    on_failure: Callable[[BaseException], None] | None
    restart_cures: bool  # False: only a new pod can help (/healthz turns 503 when given up)
    thread: threading.Thread | None = None
    up: bool = False
    failed: bool = False
    failures_in_a_row: int = 0
    last_error: str | None = None
    stopped: threading.Event = field(default_factory=threading.Event)


class Supervisor:
    """Owns the threads of the components it runs. `stop` is bounded and safe twice."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        initial_backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        max_failures: int = 5,
        healthy_after_s: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._initial = initial_backoff_s
        self._max = max_backoff_s
        self._max_failures = max_failures
        self._healthy_after = healthy_after_s
        self._monotonic = monotonic
        self._stop = threading.Event()
        self._components: dict[str, _Component] = {}
        self._lock = threading.Lock()

    def spawn(
        self,
        name: str,
        loop: Loop,
        *,
        on_failure: Callable[[BaseException], None] | None = None,
        restart_cures: bool = True,
    ) -> None:
        """Run `loop(stop_event)` on a daemon thread named pathwatch-`name`, supervised."""
        component = _Component(name, loop, on_failure, restart_cures)
        with self._lock:
            if name in self._components:
                raise ValueError(f"component {name!r} is supervised already")
            self._components[name] = component
        thread = threading.Thread(
            target=self._run, args=(component,), name=f"pathwatch-{name}", daemon=True
        )
        component.thread = thread
        thread.start()

    def _run(self, c: _Component) -> None:
        up = self._metrics.component_up.labels(component=c.name)
        backoff = self._initial
        try:
            while not self._stop.is_set():
                started = self._monotonic()
                c.up = True
                up.set(1)
                try:
                    c.loop(self._stop)
                except Exception as exc:
                    c.up = False
                    up.set(0)
                    c.last_error = f"{type(exc).__name__}: {exc}"
                    self._metrics.component_failures.labels(component=c.name).inc()
                    if self._monotonic() - started >= self._healthy_after:
                        c.failures_in_a_row, backoff = 0, self._initial
                    c.failures_in_a_row += 1
                    log.exception(
                        "component failed; restarting",
                        failed_component=c.name,
                        failures_in_a_row=c.failures_in_a_row,
                        backoff_s=backoff,
                    )
                    if c.on_failure is not None:
                        try:
                            c.on_failure(exc)
                        except Exception:
                            log.exception("cleanup after a failure failed", failed_component=c.name)
                    if c.failures_in_a_row >= self._max_failures:
                        c.failed = True
                        log.error(
                            "component given up after repeated failures",
                            failed_component=c.name,
                            error=c.last_error,
                        )
                        return
                    self._stop.wait(backoff)
                    backoff = min(self._max, backoff * 2)
                    continue
                return  # the loop returned: stopped on purpose
        finally:
            c.up = False
            up.set(0)
            c.stopped.set()

    # -- state -----------------------------------------------------------------------------

    def failed(self) -> list[str]:
        """Components given up: the service is not ready while any is."""
        return sorted(c.name for c in self._components.values() if c.failed)

    def needs_restart(self) -> list[str]:
        """Given-up components that only a new process can cure (/healthz fails on them)."""
        return sorted(c.name for c in self._components.values() if c.failed and not c.restart_cures)

    def status(self) -> dict[str, dict[str, object]]:
        return {
            c.name: {
                "up": c.up,
                "failed": c.failed,
                "failures_in_a_row": c.failures_in_a_row,
                "last_error": c.last_error,
            }
            for c in self._components.values()
        }

    def is_up(self, name: str) -> bool:
        c = self._components.get(name)
        return c is not None and c.up

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every loop to stop and wait for them, `timeout` in total. Safe twice."""
        self._stop.set()
        deadline = self._monotonic() + timeout
        for c in list(self._components.values()):
            c.stopped.wait(max(0.0, deadline - self._monotonic()))
