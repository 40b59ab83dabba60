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
import itertools
import pickle
import queue
import socket
import struct
import threading
import time
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

    def send(self, message: object) -> None:
        """Raises ChannelClosed when the peer is gone."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                self._sock.sendall(_HEADER.pack(len(payload)) + payload)
        except OSError as exc:
            raise ChannelClosed(f"cannot send: {exc}") from exc

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

    Each batch goes to `sink` at once (Backpressure is answered at once); a reply thread waits
    for the tickets in order and answers each within `reply_wait_s` of its arrival."""

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
        # Bounded by the worker's own admission (one entry per Export it waits for).
        self._pending: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()

    def serve(self) -> None:
        replier = threading.Thread(
            target=self._reply_loop, name=f"pathwatch-{self._name}-replies", daemon=True
        )
        replier.start()
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
            self._pending.put(None)
            replier.join(self._reply_wait)

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
        self._pending.put(
            _Waiting(seq, ticket, marks, extension, time.monotonic() + self._reply_wait)
        )

    def _reply_loop(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            seq = item.seq
            ticket = item.ticket
            if not ticket.wait(max(0.0, item.deadline - time.monotonic())):
                self._reply(seq, "durable write did not finish in time", False, [])
            elif ticket.error is not None:
                overloaded = isinstance(ticket.error, Backpressure)
                self._reply(seq, str(ticket.error), overloaded, [])
            else:
                self._reply(seq, None, False, *self._entries(item))

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
            self._channel.send(("done", seq, error, overloaded, entries, unlike or []))
