"""The channel between a receiver worker process and the service process that owns the store.

With `receiver.grpc.processes` above 1, Exports are decoded in worker processes
(app/workers.py); the writer stays in the service process, the only one with RocksDB open. A
worker hands each decoded request over this channel and acknowledges the Export only once the
service answers that the write is durable: the guarantee is the same as in one process.

- `Channel`: frames over a connected stream socket, each a 4-byte big-endian length and a
  pickle. Both ends are this program: the socket pair is made by the service process and
  inherited by the worker it starts (never a named socket on disk or a network address), so
  unpickling is no wider an interface than a function call.
- `RemoteSink` (worker side) is the worker's BatchSink: `submit` sends the batch and returns a
  Ticket that the answer completes.
- `Bridge` (service side) serves one worker: submits its batches to the real sink (the
  IngestWriter) and answers each once durable (or failed), with the DurableResources entries
  the write produced for the batch's resources, so the worker's fast path knows them too.
  The answer leaves from the writer's own thread right after the commit (the ticket's
  callback, `Channel.post`: never blocking, a stuck worker's answers queue), not from a
  thread woken per batch: each wake-up under the GIL cost more CPU than the answer itself.

Messages, worker -> service: ("submit", seq, batch, marks, sender, extension),
("metrics", samples). Service -> worker: ("init", config, listen, name) once, ("done", seq,
error, overloaded, entries, unlike), ("stop", grace_s).

A durable write's answer carries the DurableResources entries of the batch's marks (with their
keys), but not those of the extension's resources, which are the bulk of a minute-boundary
scrape: each of those, once its minute is logged, holds the start of that minute and the keys
the worker already keeps (`extension_value`); the answer lists only the fingerprints for which
that is not so (`unlike`: minutes that went the full path, entries the service no longer has),
with their entries among `entries` when it has one.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import pickle
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import structlog

from pathwatch.clock import MINUTE_MS
from pathwatch.observations import Extension, Mark, ObservationBatch
from pathwatch.store import durable as durable_values
from pathwatch.store.durable import DurableResources, Entry
from pathwatch.store.writer import Backpressure, BatchSink, Ticket, WriteFailed

log = structlog.get_logger(component="receiver")

_HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30  # a decoded 64 MiB request stays far below; past it the peer is broken
_REPLY_MARGIN_S = 5.0  # the service answers a batch at most this long after the worker gave up
_WATCH_EVERY_S = 1.0  # how often a Bridge looks for batches not answered in time


def extension_value(extension: Extension) -> int:
    """The DurableResources value of an extension's resources once their minute is logged."""
    minute_ms = extension.time_ms // MINUTE_MS * MINUTE_MS
    return durable_values.encode(minute_ms, True)


class ChannelClosed(Exception):
    """The peer closed the channel or sent something that is not a frame."""


class Channel:
    """Thread-safe sending, single-reader receiving, of pickled frames over `sock`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb", buffering=1 << 16)
        self._send_lock = threading.Lock()
        # Frames `post` could not hand to the socket at once, in order, and whether a thread
        # is writing them (then every frame queues behind them: frames never interleave).
        self._backlog: deque[bytes] = deque()
        self._flushing = False
        self._broken: str | None = None

    @staticmethod
    def _frame(message: object) -> bytes:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        return _HEADER.pack(len(payload)) + payload

    def send(self, message: object) -> None:
        """Blocks until the socket took the whole frame (or, behind frames `post` queued, until
        it is queued after them). Raises ChannelClosed when the peer is gone."""
        frame = self._frame(message)
        try:
            with self._send_lock:
                if not self._queued(frame):
                    self._sock.sendall(frame)
        except OSError as exc:
            raise ChannelClosed(f"cannot send: {exc}") from exc

    def _queued(self, frame: bytes) -> bool:
        """Under the send lock: queue `frame` behind frames still being flushed (True), or
        leave it to the caller to write now (False). Raises ChannelClosed when broken."""
        if self._broken is not None:
            raise ChannelClosed(self._broken)
        if self._flushing:
            self._backlog.append(frame)
            return True
        return False

    def post(self, message: object) -> None:
        """Send without ever blocking the caller (the service's writer thread answers workers
        with it): what the socket does not take at once is queued, in order, and written by
        a short-lived thread. A peer that stopped reading holds at most one frame per batch it
        is waiting for. Raises ChannelClosed when the peer is gone."""
        frame = self._frame(message)
        with self._send_lock:
            if self._queued(frame):
                return
            try:
                sent = self._sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._broken = f"cannot send: {exc}"
                raise ChannelClosed(self._broken) from exc
            if sent == len(frame):
                return
            self._backlog.append(frame[sent:])
            self._flushing = True
        threading.Thread(target=self._flush, name="pathwatch-channel-flush", daemon=True).start()

    def _flush(self) -> None:
        while True:
            with self._send_lock:
                if not self._backlog:
                    self._flushing = False
                    return
                frame = self._backlog.popleft()
            try:
                self._sock.sendall(frame)  # outside the lock: `post` queues meanwhile
            except OSError as exc:
                with self._send_lock:
                    self._broken = f"cannot send: {exc}"
                    self._backlog.clear()
                    self._flushing = False
                return

    def recv(self) -> Any:
        """The next message, or None once the peer closed its end."""
        try:
            header = self._reader.read(_HEADER.size)
            if not header:
                return None
            if len(header) < _HEADER.size:
                raise ChannelClosed("truncated frame header")
            (size,) = _HEADER.unpack(header)
            if size > MAX_FRAME:
                raise ChannelClosed(f"frame of {size} bytes (at most {MAX_FRAME})")
            payload = self._reader.read(size)
        except OSError as exc:
            raise ChannelClosed(f"cannot receive: {exc}") from exc
        if len(payload) < size:
            raise ChannelClosed("truncated frame")
        return pickle.loads(payload)

    def settimeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def close_sending(self) -> None:
        """Tell the peer nothing more comes (it reads EOF); receiving goes on."""
        with contextlib.suppress(OSError), self._send_lock:
            self._sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.close()
        self._sock.close()


class RemoteSink:
    """Worker side: batches go to the service process; `complete` applies its answers.

    Pending tickets are bounded by the worker's own receiver (every Export holds one while it
    waits, at most its admitted capacity), and the service answers each, late or not."""

    def __init__(self, channel: Channel, durable: DurableResources | None) -> None:
        self._channel = channel
        self._durable = durable
        # seq -> the Export's ticket, and its extension's fingerprints and their value
        self._waiting: dict[int, tuple[Ticket, tuple[int, ...], int]] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._closed: str | None = None

    def submit(
        self,
        batch: ObservationBatch,
        marks: Sequence[Mark] = (),
        sender: str = "",
        extension: Extension | None = None,
    ) -> Ticket:
        ticket = Ticket(len(batch) + (len(extension) if extension is not None else 0))
        if not batch and extension is None and not marks:
            ticket.finish(None)
            return ticket
        with self._lock:
            if self._closed is not None:
                ticket.finish(WriteFailed(self._closed))
                return ticket
            seq = next(self._seq)
            if extension is None:
                self._waiting[seq] = (ticket, (), 0)
            else:
                fingerprints = tuple([fp for fp, _ in extension.resources])
                self._waiting[seq] = (ticket, fingerprints, extension_value(extension))
        try:
            self._channel.send(("submit", seq, batch, list(marks), sender, extension))
        except ChannelClosed as exc:
            with self._lock:
                self._waiting.pop(seq, None)
            ticket.finish(WriteFailed(f"the service process is unreachable: {exc}"))
        return ticket

    def complete(
        self,
        seq: int,
        error: str | None,
        overloaded: bool,
        entries: list[Entry],
        unlike: list[int],
    ) -> None:
        with self._lock:
            waiting = self._waiting.pop(seq, None)
        if waiting is None:
            if self._durable is not None and entries:
                self._durable.add(entries)
            return
        ticket, extended, value = waiting
        # Before the ticket: the next scrape may use them.
        if self._durable is not None and error is None:
            if extended:
                if unlike:
                    skip = set(unlike)
                    extended = tuple([fp for fp in extended if fp not in skip])
                self._durable.refresh(extended, value)
            if entries:
                self._durable.add(entries)
        if error is None:
            ticket.finish(None)
        else:
            ticket.finish(Backpressure(error) if overloaded else WriteFailed(error))

    def close(self, reason: str) -> None:
        """Fail every pending ticket (their Exports are answered UNAVAILABLE) and refuse more."""
        with self._lock:
            self._closed = reason
            waiting, self._waiting = self._waiting, {}
        for ticket, _, _ in waiting.values():
            ticket.finish(WriteFailed(reason))


class _Waiting(NamedTuple):
    """A batch the service took from a worker, until its answer is sent."""

    seq: int
    ticket: Ticket
    marks: Sequence[Mark]
    extension: Extension | None
    deadline: float


class Bridge:
    """Service side of one worker's channel: `serve` returns once the worker closed it.

    Each batch goes to `sink` at once (Backpressure is answered at once). The answer is sent
    by the ticket's callback, on the thread that finished it (the writer's, right after the
    commit: `Channel.post` never blocks it); a batch not finished `reply_wait_s` after its
    arrival is answered as failed by a watchdog thread, and its late completion dropped."""

    def __init__(
        self,
        channel: Channel,
        sink: BatchSink,
        durable: DurableResources | None,
        reply_wait_s: float,
        on_metrics: Callable[[list[Any]], None],
        name: str,
    ) -> None:
        self._channel = channel
        self._sink = sink
        self._durable = durable
        self._reply_wait = reply_wait_s + _REPLY_MARGIN_S
        self._on_metrics = on_metrics
        self._name = name
        # Batches submitted and not answered yet, by seq. Bounded by the worker's own
        # admission (one entry per Export it waits for).
        self._open: dict[int, _Waiting] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def serve(self) -> None:
        watchdog = threading.Thread(
            target=self._watch, name=f"pathwatch-{self._name}-watchdog", daemon=True
        )
        watchdog.start()
        try:
            while True:
                message = self._channel.recv()
                if message is None:
                    return
                kind = message[0]
                if kind == "submit":
                    self._submit(*message[1:])
                elif kind == "metrics":
                    self._on_metrics(message[1])
                else:
                    raise ChannelClosed(f"unexpected message {kind!r} from {self._name}")
        finally:
            self._wait_answered(self._reply_wait)
            self._closed.set()
            watchdog.join(self._reply_wait)

    def _submit(
        self,
        seq: int,
        batch: ObservationBatch,
        marks: list[Mark],
        sender: str,
        extension: Extension | None,
    ) -> None:
        try:
            ticket = self._sink.submit(batch, marks, sender=sender, extension=extension)
        except Backpressure as exc:
            self._reply(seq, str(exc), True, [])
            return
        item = _Waiting(seq, ticket, marks, extension, time.monotonic() + self._reply_wait)
        with self._lock:
            self._open[seq] = item
        ticket.add_done_callback(functools.partial(self._finished, item))

    def _finished(self, item: _Waiting) -> None:
        """The ticket's callback: answer the batch, unless the watchdog did already."""
        with self._lock:
            if self._open.pop(item.seq, None) is None:
                return
        error = item.ticket.error
        if error is not None:
            self._reply(item.seq, str(error), isinstance(error, Backpressure), [])
        else:
            self._reply(item.seq, None, False, *self._entries(item))

    def _watch(self) -> None:
        while not self._closed.wait(_WATCH_EVERY_S):
            now = time.monotonic()
            with self._lock:
                late = [seq for seq, item in self._open.items() if item.deadline <= now]
                for seq in late:
                    del self._open[seq]
            for seq in late:
                self._reply(seq, "durable write did not finish in time", False, [])

    def _wait_answered(self, timeout: float) -> None:
        """After the worker closed its end: give the batches it sent time to be answered (a
        worker that is stopping still reads its answers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._open:
                    return
            time.sleep(0.01)

    def _entries(self, item: _Waiting) -> tuple[list[Entry], list[int]]:
        """What the write made durable for these resources, as the service's own
        DurableResources holds it (the writer filled it before completing the ticket): the
        marks' entries, and the extension's resources that do not hold `extension_value`
        (with their entries, when there are some)."""
        durable = self._durable
        if durable is None:
            return [], []
        entries: list[Entry] = []
        for mark in item.marks:
            value = durable.get(mark.fingerprint)
            if value is not None:
                entries.append((mark.fingerprint, value, durable.keys_of(mark.fingerprint) or ()))
        unlike: list[int] = []
        if item.extension is not None:
            expected = extension_value(item.extension)
            get = durable.get
            for fp, _ in item.extension.resources:
                value = get(fp)
                if value != expected:
                    unlike.append(fp)
                    if value is not None:
                        entries.append((fp, value, durable.keys_of(fp) or ()))
        return entries, unlike

    def _reply(
        self,
        seq: int,
        error: str | None,
        overloaded: bool,
        entries: list[Entry],
        unlike: list[int] | None = None,
    ) -> None:
        # A worker gone meanwhile answered its Exports UNAVAILABLE when its channel closed.
        with contextlib.suppress(ChannelClosed):
            self._channel.post(("done", seq, error, overloaded, entries, unlike or []))
