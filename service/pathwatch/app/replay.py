"""replay: recorded OTLP metrics files into the first-seen store, as if they had been received.

Formats, detected per file (a file that starts with the gzip magic is gunzipped first):

- JSON lines, one OTLP/JSON ExportMetricsServiceRequest (or MetricsData) per line, as the
  collector's file exporter writes with ``format: json``: the first non-blank byte is ``{``;
- protobuf messages each prefixed by a 4-byte big-endian length, as the file exporter writes
  with ``format: proto``: the first byte is 0 (a first message under 16 MiB);
- protobuf messages each prefixed by a varint length (the OTLP file format's "delimited"
  form): anything else, including ``{`` directly followed by a newline (a 123-byte message).

Every request goes through ``Decoder.decode`` with the caller's TimeBounds, so points outside
them are rejected and counted exactly as the receivers would; the observations of many requests
are merged (up to ~50k keys) before each ``FirstSeenStore.apply``. A line or message that does
not parse is counted and reported with its position, and the replay goes on; a length prefix
that runs past the end of the file (or is absurd) ends that file. A StoreError stops the replay:
what was applied stays, and replaying again is harmless (presence merges idempotently).

The store is written directly, so run it on a stopped data dir. Replay raises no alerts: the
stream and new-key-limit results of its writes are dropped. Not thread-safe.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, TextIO

import structlog
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from pathwatch.clock import Clock
from pathwatch.observations import ObservationBatch, merge_into
from pathwatch.receiver.decode import Decoder, InvalidRequest, TimeBounds
from pathwatch.store.firstseen import FirstSeenStore, Retention

log = structlog.get_logger(component="replay")

FLUSH_KEYS = 50_000  # keys merged before one store write
FLUSH_MINUTES = 2_000_000  # or this many key-minutes: bounds memory for long, dense recordings
MAX_MESSAGE_BYTES = 256 << 20  # a larger length prefix is taken for corruption
MAX_REPORTS_PER_FILE = 20
_GZIP_MAGIC = b"\x1f\x8b"
_U32 = struct.Struct(">I")


@dataclass(slots=True)
class ReplayStats:
    files: int = 0
    requests: int = 0  # requests decoded
    bad_requests: int = 0  # lines or messages that could not be parsed or decoded
    resources_tracked: int = 0
    points_accepted: int = 0
    points_rejected: int = 0  # outside the TimeBounds, or an oversized key attribute
    keys_written: int = 0
    keys_refused: int = 0  # new keys past the store's new-key limits (not tracked)


class _Stream(Protocol):
    """What replay reads from: a plain file or a gzip stream."""

    def read(self, size: int = -1, /) -> bytes: ...

    def readline(self, size: int = -1, /) -> bytes: ...

    def tell(self) -> int: ...


class _Corrupt(Exception):
    """The framing of a binary file is broken: nothing after this point can be trusted."""


class _BadRequest(Exception):
    """One line or message cannot be used; the next one may be fine."""


def _varint(stream: _Stream) -> int | None:
    """A varint length prefix; None at a clean end of file."""
    value = shift = 0
    for i in range(10):
        byte = stream.read(1)
        if not byte:
            if i == 0:
                return None
            raise _Corrupt("the file ends inside a length prefix")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
    raise _Corrupt("a length prefix is longer than 10 bytes")


def _u32(stream: _Stream) -> int | None:
    raw = stream.read(4)
    if not raw:
        return None
    if len(raw) < 4:
        raise _Corrupt("the file ends inside a length prefix")
    return int(_U32.unpack(raw)[0])


def _from_json(line: bytes) -> bytes:
    if line.lstrip()[:1] != b"{":
        raise _BadRequest("not a JSON object")
    request = ExportMetricsServiceRequest()
    try:
        json_format.Parse(line, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, RecursionError) as exc:
        raise _BadRequest(f"cannot parse OTLP/JSON: {exc}") from None
    return request.SerializeToString()


def _json_lines(stream: _Stream) -> Iterator[tuple[str, bytes | _BadRequest]]:
    number = 0
    while True:
        line = stream.readline(MAX_MESSAGE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_MESSAGE_BYTES and not line.endswith(b"\n"):
            while (rest := stream.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass  # skip the rest of an over-long line
            yield f"line {number}", _BadRequest(f"longer than {MAX_MESSAGE_BYTES} bytes")
            continue
        if not line.strip():
            continue
        try:
            yield f"line {number}", _from_json(line)
        except _BadRequest as exc:
            yield f"line {number}", exc


def _frames(stream: _Stream, fixed: bool) -> Iterator[tuple[str, bytes | _BadRequest]]:
    number = offset = 0
    while True:
        length = _u32(stream) if fixed else _varint(stream)
        if length is None:
            return
        number += 1
        where = f"message {number} (byte {offset})"
        if length > MAX_MESSAGE_BYTES:
            raise _Corrupt(f"{where}: length prefix {length} exceeds {MAX_MESSAGE_BYTES}")
        data = stream.read(length)
        if len(data) < length:
            raise _Corrupt(f"{where}: the file ends inside the message")
        offset = stream.tell()
        if data[:1] == b"{":  # the file exporter frames JSON this way when it compresses
            try:
                data = _from_json(data)
            except _BadRequest as exc:
                yield where, exc
                continue
        yield where, data


def _requests(stream: _Stream, head: bytes) -> Iterator[tuple[str, bytes | _BadRequest]]:
    """(position, request bytes or the reason it is unusable), in file order; `head` is the
    start of the stream, peeked."""
    if not head:
        return
    blank = head.lstrip(b" \t\r\n")
    if (blank[:1] == b"{" and not head.startswith(b"{\n")) or not blank:
        yield from _json_lines(stream)
    else:
        yield from _frames(stream, fixed=head[0] == 0)


class _Progress:
    """A progress line on `out`: redrawn in place at most 10 times a second on a terminal,
    a new line every 5 seconds otherwise; reports go on their own lines."""

    def __init__(self, out: TextIO | None, total_bytes: int, clock: Clock) -> None:
        self._out = out
        self._total = max(1, total_bytes)
        self._clock = clock
        self._tty = bool(out is not None and getattr(out, "isatty", lambda: False)())
        self._interval = 0.1 if self._tty else 5.0
        self._started = clock.monotonic()
        self._last = self._started
        self._width = 0

    def _rate(self, requests: int) -> float:
        elapsed = self._clock.monotonic() - self._started
        return requests / elapsed if elapsed > 0 else 0.0

    def update(self, done: int, stats: ReplayStats, keys: int) -> None:
        if self._out is None:
            return
        now = self._clock.monotonic()
        if now - self._last < self._interval:
            return
        self._last = now
        share = min(1.0, done / self._total)
        filled = int(share * 20)
        line = (
            f"[{'#' * filled}{'.' * (20 - filled)}] {share * 100:5.1f}% "
            f"{done / 2**20:.1f}/{self._total / 2**20:.1f} MiB  {stats.requests} requests  "
            f"{keys} keys  {self._rate(stats.requests):.0f} req/s"
        )
        if self._tty:
            self._out.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self._out.write(line + "\n")
        self._out.flush()

    def report(self, message: str) -> None:
        if self._out is None:
            log.warning("replay: unusable request", detail=message)
            return
        if self._tty and self._width:
            self._out.write("\r" + " " * self._width + "\r")
            self._width = 0
        self._out.write(message + "\n")
        self._out.flush()

    def finish(self, stats: ReplayStats) -> None:
        if self._out is None:
            return
        elapsed = self._clock.monotonic() - self._started
        if self._tty and self._width:
            self._out.write("\r" + " " * self._width + "\r")
        self._out.write(
            f"replayed {stats.files} file(s): {stats.requests} requests "
            f"({stats.bad_requests} unusable), {stats.resources_tracked} resources tracked, "
            f"{stats.points_accepted} points accepted, {stats.points_rejected} rejected, "
            f"{stats.keys_written} key writes ({stats.keys_refused} new keys refused by limits) "
            f"in {elapsed:.1f} s ({self._rate(stats.requests):.0f} req/s)\n"
        )
        self._out.flush()


def replay(
    paths: list[str],
    decoder: Decoder,
    store: FirstSeenStore,
    retention: Mapping[str, Retention],
    clock: Clock,
    bounds: TimeBounds,
    progress: TextIO | None,
) -> ReplayStats:
    """Replay `paths` in order into `store` (see the module docstring). Raises OSError when a
    file cannot be opened (before anything is written when it is missing) and StoreError when
    a write fails."""
    sizes = [os.path.getsize(p) for p in paths]
    meter = _Progress(progress, sum(sizes), clock)
    stats = ReplayStats()
    pending: ObservationBatch = {}
    pending_minutes = 0

    def flush() -> None:
        nonlocal pending, pending_minutes
        if pending:
            result = store.apply(pending, retention, clock.now_ms())
            stats.keys_written += result.keys_written
            stats.keys_refused += result.keys_refused
        pending, pending_minutes = {}, 0

    done_before = 0
    for path, size in zip(paths, sizes, strict=True):
        stats.files += 1
        reported = 0
        with open(path, "rb") as raw:
            compressed = raw.peek(2)[:2] == _GZIP_MAGIC
            stream: gzip.GzipFile | io.BufferedReader = (
                gzip.GzipFile(fileobj=raw) if compressed else raw
            )
            try:
                for where, item in _requests(stream, stream.peek(64)):
                    if not isinstance(item, bytes):
                        error: Exception = item
                    else:
                        try:
                            result = decoder.decode(item, bounds)
                        except InvalidRequest as exc:
                            error = exc
                        else:
                            stats.requests += 1
                            stats.resources_tracked += result.resources_tracked
                            stats.points_accepted += result.points_accepted
                            stats.points_rejected += result.points_rejected
                            merge_into(pending, result.batch)
                            pending_minutes += sum(len(s.minutes) for s in result.batch.values())
                            if len(pending) >= FLUSH_KEYS or pending_minutes >= FLUSH_MINUTES:
                                flush()
                            meter.update(
                                done_before + raw.tell(), stats, stats.keys_written + len(pending)
                            )
                            continue
                    stats.bad_requests += 1
                    reported += 1
                    if reported <= MAX_REPORTS_PER_FILE:
                        meter.report(f"{path}: {where}: {error}")
                    elif reported == MAX_REPORTS_PER_FILE + 1:
                        meter.report(f"{path}: further unusable requests are counted, not shown")
            except (_Corrupt, EOFError, gzip.BadGzipFile, zlib.error) as exc:
                # EOFError, BadGzipFile, zlib.error: a truncated or corrupt gzip stream.
                stats.bad_requests += 1
                meter.report(f"{path}: {exc}; the rest of this file is skipped")
        done_before += size
    flush()
    meter.update(done_before, stats, stats.keys_written)
    meter.finish(stats)
    return stats
