"""IngestWriter: the single writer thread; group commits, a bounded queue, backpressure.

Receivers call `submit` from any thread; it never blocks. The writer drains everything queued,
merges it, and commits it in one durable RocksDB write, then completes every ticket at once, so
one WAL write (and fsync) is shared by all exports that arrived meanwhile.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from pathwatch.clock import MINUTE_MS, Clock
from pathwatch.observations import Extension, Mark, ObservationBatch, RuleKey, Sighting, merge_into
from pathwatch.store.db import StoreError
from pathwatch.store.durable import DurableResources
from pathwatch.store.extend import rule_key_of
from pathwatch.store.firstseen import ApplyResult, FirstSeenStore, Retention, StreamHit
from pathwatch.store.guard import LimitHit
from pathwatch.store.sweep import KeyspaceSweeper
from pathwatch.telemetry.metrics import Metrics

log = structlog.get_logger(component="store")


class Backpressure(Exception):
    """The writer's queue is full: the caller should answer 'retry later'. Retryable."""


class WriteFailed(Exception):
    """The store could not write the batch (disk full, RocksDB error). Retryable."""


class TickWatermarks:
    """Per rule, the latest tick whose evaluation may have read the store, shared by the tick
    runner and the writer so that no observation falls between them.

    The runner calls `advance` before it evaluates a tick; the writer holds `lock` from reading
    the watermarks until its commit. So a write either committed before the evaluation read
    the store (the evaluation sees it) or read a watermark that covers the tick (the write
    lists its minutes as late, for the next tick). `advance` waits at most one commit.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._through: dict[str, int] = {}

    def advance(self, rule_id: str, tick_ms: int) -> None:
        with self.lock:
            if tick_ms > self._through.get(rule_id, -1):
                self._through[rule_id] = tick_ms

    def snapshot(self) -> dict[str, int]:
        """Call with `lock` held."""
        return dict(self._through)


_Item = tuple[ObservationBatch, "Ticket", Sequence[Mark], str, Extension | None]


class _Job:
    """Work for the writer thread (`IngestWriter.run_exclusive`)."""

    __slots__ = ("done", "error", "result", "work")

    def __init__(self, work: Callable[[], object]) -> None:
        self.work = work
        self.done = threading.Event()
        self.result: object = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except Exception as exc:  # handed to the caller, who classifies it
            self.error = exc
        finally:
            self.done.set()


class Ticket:
    """Completion of one submitted batch: `wait` returns once it is durable or failed, and
    callbacks added with `add_done_callback` run then, on the thread that finished it."""

    __slots__ = ("_callbacks", "_done", "_lock", "error", "size")

    def __init__(self, size: int) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] | None = []
        self.error: Exception | None = None
        self.size = size

    def wait(self, timeout: float) -> bool:
        """True when finished within `timeout` seconds (check `error`), False when still pending."""
        return self._done.wait(timeout)

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once finished: at once when it is, else on the thread that
        finishes it (the writer's: keep it short and never blocking)."""
        with self._lock:
            callbacks = self._callbacks
            if callbacks is not None:
                callbacks.append(callback)
                return
        callback()

    def finish(self, error: Exception | None) -> None:
        """Complete the ticket (`error` None: durable). Called once, by whoever wrote it."""
        self.error = error
        with self._lock:
            callbacks, self._callbacks = self._callbacks, None
        self._done.set()
        for callback in callbacks or ():
            try:
                callback()
            except Exception:  # one waiter's bug must not keep the others waiting
                log.exception("ticket callback failed")


class BatchSink(Protocol):
    """Where receivers hand decoded batches: the IngestWriter in the service's own process,
    or the channel a receiver worker process has to it (receiver/workers.py)."""

    def submit(
        self,
        batch: ObservationBatch,
        marks: Sequence[Mark] = (),
        sender: str = "",
        extension: Extension | None = None,
    ) -> Ticket: ...


FOLD_CHUNK = 2_000  # keys folded between two group commits (~50 ms of writer time)
FOLD_RETRY_S = 5.0  # after a fold the store refused


@dataclass(frozen=True, slots=True)
class WriterConfig:
    max_pending_keys: int = 50_000
    expiry_interval_s: float = 3600.0
    # Logged minutes are folded into key records this often (store/extend.py); 0 logs none.
    fold_interval_s: float = 600.0


class IngestWriter:
    """Owns every mutation of first-seen state. start() once; shutdown() is bounded and idempotent.

    The queue is bounded by `max_pending_keys` (keys awaiting a write, summed over batches):
    `submit` raises Backpressure instead of queueing past it.
    """

    def __init__(
        self,
        store: FirstSeenStore,
        retention: Callable[[], Mapping[str, Retention]],
        clock: Clock,
        metrics: Metrics,
        config: WriterConfig | None = None,
        on_limit: Callable[[tuple[LimitHit, ...]], object] = lambda hits: None,
        on_stream: Callable[[tuple[StreamHit, ...]], object] = lambda hits: None,
        durable: DurableResources | None = None,
        watermarks: TickWatermarks | None = None,
        sweeper: KeyspaceSweeper | None = None,
    ) -> None:
        self._sweeper = sweeper
        self._durable = durable
        self.watermarks = watermarks or TickWatermarks()
        self._on_limit = on_limit
        self._on_stream = on_stream
        self._store = store
        self._retention = retention
        self._clock = clock
        self._metrics = metrics
        self._config = config or WriterConfig()
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._pending = 0
        self._jobs: deque[_Job] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._exited = threading.Event()
        self._exited.set()  # not running yet
        self._down = False  # the loop died and has not restarted: submit refuses at once
        self._next_expiry = 0.0
        self._next_fold = 0.0
        self._fold_retry_at = 0.0
        self.last_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    @property
    def pending_keys(self) -> int:
        return self._pending

    def start(self) -> None:
        """Run the loop on a plain thread (the service runs `run` under its Supervisor)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self.run, args=(threading.Event(),), name="pathwatch-writer", daemon=True
        )
        self._exited.clear()
        self._thread.start()

    def submit(
        self,
        batch: ObservationBatch,
        marks: Sequence[Mark] = (),
        sender: str = "",
        extension: Extension | None = None,
    ) -> Ticket:
        """Queue `batch` (and `extension`, minutes to log) for a durable write. Never blocks;
        raises Backpressure when full.

        Once the write is durable, `marks` (resources seen in one minute) go to the
        DurableResources, so that the next scrapes of those resources in that minute skip
        decoding and writing."""
        if extension is not None and self._config.fold_interval_s <= 0:
            batch = dict(batch)  # logging is off: the minutes are written like any other
            t = extension.time_ms
            marks = list(marks)
            for fingerprint, items in extension.resources:
                rule_keys = tuple(map(rule_key_of, items))
                for rk in rule_keys:
                    merge_into(batch, {rk: Sighting({t // MINUTE_MS}, t, t)})
                marks.append(Mark(fingerprint, t // MINUTE_MS, t, rule_keys))
            extension = None
        size = len(batch) + (len(extension) if extension is not None else 0)
        ticket = Ticket(size)
        if not batch and extension is None:
            if marks and self._durable is not None:  # resources that yield no key
                self._durable.add(self._store.durable_entries(marks, {}))
            ticket.finish(None)
            return ticket
        with self._cond:
            if self._stopping:
                raise Backpressure("pathwatch is shutting down")
            if self._down:
                raise Backpressure(f"the store writer is restarting after: {self.last_error}")
            if self._pending + size > self._config.max_pending_keys and self._pending > 0:
                raise Backpressure(f"write queue full ({self._pending} keys pending)")
            self._queue.append((batch, ticket, marks, sender, extension))
            self._pending += size
            self._metrics.store_pending_keys.set(self._pending)
            self._cond.notify()
        return ticket

    def run(self, stop: threading.Event) -> None:
        """The writer loop. Returns once shutdown() was called and the queue is written.

        An unexpected exception escapes for the Supervisor to log, count and restart; before
        it does, every batch taken or queued is failed (its Export is answered UNAVAILABLE with
        RetryInfo at once, not after a timeout) and `submit` refuses until the loop runs again.
        """
        self._exited.clear()
        self._next_expiry = self._clock.monotonic() + 60.0
        self._next_fold = self._clock.monotonic() + self._config.fold_interval_s
        with self._cond:
            if self._down:
                self._down, self.last_error = False, None
        items: list[_Item] = []
        try:
            self._recover()
            while True:
                with self._cond:
                    if (
                        not self._queue
                        and not self._jobs
                        and not self._stopping
                        and not self._fold_due()
                    ):
                        self._cond.wait(timeout=1.0)
                    items = list(self._queue)
                    self._queue.clear()
                    jobs = list(self._jobs)
                    self._jobs.clear()
                    stopping = self._stopping
                if items:
                    self._write(items)
                    items = []
                if jobs:
                    self._fold_everything()  # a job may read records behind the store's back
                for job in jobs:
                    job.run()
                if not stopping and self._fold_due():
                    self._fold_step()
                if not stopping and self._clock.monotonic() >= self._next_expiry:
                    self._expire()
                if stopping and not items:
                    return
        except BaseException as exc:
            self._fail_all(items, exc)
            raise
        finally:
            self._exited.set()

    def run_exclusive(self, work: Callable[[], object], timeout: float) -> object:
        """Run `work` on the writer thread between two group commits (the single-writer rule:
        a baseline import merges records that `apply` also writes) and return its result, or
        raise what it raised. TimeoutError when it has not finished within `timeout` s (it may
        still run); Backpressure when the writer is not running."""
        job = _Job(work)
        with self._cond:
            if self._stopping or self._down or self._exited.is_set():
                raise Backpressure("the store writer is not running")
            self._jobs.append(job)
            self._cond.notify()
        if not job.done.wait(timeout):
            raise TimeoutError(f"the store writer did not run the job within {timeout:g} s")
        if job.error is not None:
            raise job.error
        return job.result

    def _fail_all(self, taken: list[_Item], exc: BaseException) -> None:
        error = WriteFailed(f"the store writer failed: {type(exc).__name__}: {exc}")
        with self._cond:
            self._down = True
            self.last_error = str(error)
            queued = list(self._queue)
            self._queue.clear()
            self._pending = 0
            self._metrics.store_pending_keys.set(0)
        for _, ticket, _, _, _ in [*taken, *queued]:
            if not ticket.wait(0):
                ticket.finish(error)

    def _write(self, items: list[_Item]) -> None:
        if len(items) == 1:
            merged = items[0][0]  # the common case under light load: nothing to merge
        else:
            merged = {}
            for batch, _, _, _, _ in items:
                merge_into(merged, batch)
        extensions = [ext for _, _, _, _, ext in items if ext is not None]

        def sender_of(rk: RuleKey) -> str:
            """The first sender that brought `rk`: asked for new keys only, which are rare,
            so nothing is built per write on the hot path."""
            for batch, _, _, sender, _ in items:
                if rk in batch:
                    return sender
            return ""

        error: Exception | None = None
        started = self._clock.monotonic()
        try:
            with self.watermarks.lock:
                result = self._store.apply(
                    merged,
                    self._retention(),
                    self._clock.now_ms(),
                    sender_of,
                    self.watermarks.snapshot(),
                    extensions,
                )
        except StoreError as exc:
            error = WriteFailed(str(exc))
            if self.last_error is None:
                log.error("store write failed", error=str(exc))
            self.last_error = str(exc)
            self._metrics.store_write_errors.inc()
        else:
            if self.last_error is not None:
                log.info("store writes succeed again", previous_error=self.last_error)
            self.last_error = None
            if self._durable is not None:
                self._durable.add(
                    self._store.durable_entries(
                        [
                            *(m for _, _, marks, _, _ in items for m in marks),
                            *result.extension_marks,
                        ],
                        result.states,
                    )
                )
                for value, fingerprints in result.extended:
                    self._durable.refresh(fingerprints, value)
            self._account(result)
            self._metrics.store_write_seconds.observe(self._clock.monotonic() - started)
        with self._cond:
            self._pending -= sum(t.size for _, t, _, _, _ in items)
            self._metrics.store_pending_keys.set(self._pending)
        for _, ticket, _, _, _ in items:
            ticket.finish(error)

    def _account(self, result: ApplyResult) -> None:
        """Metrics, limit and stream alerts of a committed write (a group commit or a fold)."""
        self._metrics.store_minutes_logged.inc(result.keys_extended)
        self._metrics.store_keys_pending_fold.set(len(self._store.pending))
        self._metrics.store_keys_written.inc(result.keys_written)
        self._metrics.store_keys_created.inc(result.keys_created)
        if result.late_untrusted:
            self._metrics.late_points.labels(outcome="untrusted").inc(result.late_untrusted)
        if result.late_after_tick:
            self._metrics.late_points.labels(outcome="after_tick").inc(result.late_after_tick)
        if result.keys_refused:
            self._metrics.keys_refused.inc(result.keys_refused)
        if result.limit_hits:
            for hit in result.limit_hits:
                self._metrics.key_limit_hits.labels(scope=hit.scope).inc()
                log.warning("new-key limit reached", rule=hit.rule_id, host=hit.host,
                            sender=hit.sender, limit=hit.limit)  # fmt: skip
            try:
                self._on_limit(result.limit_hits)
            except Exception:
                log.exception("cannot record the new-key limit alert")
        if result.stream_hits:
            # The scheduled tick re-finds these if this fails: it is the safety net.
            try:
                self._on_stream(result.stream_hits)
            except Exception:
                log.exception("cannot record stream alerts; the next tick will")

    # -- logged minutes (store/extend.py) ---------------------------------------------------

    def _recover(self) -> None:
        """Read the extension log left by the previous process back into memory, before the
        first write: its minutes were acknowledged, and are folded like any others."""
        minutes = self._store.load_pending()
        if minutes:
            self._next_fold = self._clock.monotonic()  # fold them from now on
            log.info("logged minutes recovered", minutes=minutes,
                     keys=len(self._store.pending))  # fmt: skip
        self._metrics.store_keys_pending_fold.set(len(self._store.pending))

    def _fold_due(self) -> bool:
        """A fold cycle runs, or is due: `fold_interval` passed, or as many minutes were
        logged as a key scraped every minute logs in that time (so the fold's cost per
        minute is the same whether ten minutes take ten minutes or, replayed, seconds)."""
        pending = self._store.pending
        now = self._clock.monotonic()
        if not pending.unfolded or now < self._fold_retry_at:
            return False
        if pending.folding or now >= self._next_fold:
            return True
        per_key = max(1.0, self._config.fold_interval_s / 60.0)
        return pending.fresh_minutes >= per_key * max(1, len(pending.fresh))

    def _fold_step(self) -> None:
        """Fold one chunk of logged minutes into their records (one fold cycle is many
        steps, each between two group commits, so ingest never waits for a whole fold)."""
        started = self._clock.monotonic()
        try:
            with self.watermarks.lock:
                result = self._store.fold(
                    FOLD_CHUNK,
                    self._retention(),
                    self._clock.now_ms(),
                    self.watermarks.snapshot(),
                )
        except StoreError as exc:
            self._metrics.store_write_errors.inc()
            log.error("fold of logged minutes failed; retried", error=str(exc),
                      retry_in_s=FOLD_RETRY_S)  # fmt: skip
            self._fold_retry_at = self._clock.monotonic() + FOLD_RETRY_S
            return
        finally:
            self._metrics.store_fold_seconds.inc(self._clock.monotonic() - started)
        if result is not None:
            self._account(result)
        if not self._store.pending.folding:
            self._next_fold = self._clock.monotonic() + self._config.fold_interval_s
        self._metrics.store_keys_pending_fold.set(len(self._store.pending))

    def _fold_everything(self) -> None:
        """Fold all logged minutes now (before a job that reads records directly)."""
        pending = self._store.pending
        while pending.unfolded:
            before = (len(pending), pending.cleared)
            self._next_fold = self._fold_retry_at = 0.0
            self._fold_step()
            if (len(pending), pending.cleared) == before and not pending.folding:
                break  # the store refuses: the job runs on what is written

    def _expire(self) -> None:
        """The hourly sweep, on the writer thread (it rewrites what `apply` writes): with a
        KeyspaceSweeper every keyspace past its owner's retention, else each rule's keys."""
        self._next_expiry = self._clock.monotonic() + self._config.expiry_interval_s
        now = self._clock.now_ms()
        try:
            if self._sweeper is not None:
                counts = self._sweeper.sweep(self._retention(), now)
            else:
                counts = {"R": sum(self._store.expire(r, ret, now)
                                   for r, ret in self._retention().items())}  # fmt: skip
        except StoreError as exc:
            log.error("expiry failed; retried at the next interval", error=str(exc))
            return
        except Exception:
            # A bug in the sweep must not stop ingest: counted, retried next interval.
            self._metrics.component_failures.labels(component="expiry").inc()
            log.exception("expiry failed; retried at the next interval")
            return
        for tag, n in counts.items():
            if n:
                self._metrics.keyspace_swept.labels(keyspace=tag).inc(n)
        if counts.get("R"):
            self._metrics.store_keys_expired.labels(rule="*").inc(counts["R"])
            if self._durable is not None:
                self._durable.clear()  # entries may name deleted keys
            log.info("expired keys", keys=counts["R"])
        if any(counts.values()):
            log.info("swept", **{tag: n for tag, n in counts.items() if n})

    def shutdown(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop. Safe before start and twice."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._exited.wait(timeout)
