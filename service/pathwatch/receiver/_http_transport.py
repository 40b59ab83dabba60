"""HTTP/1.1 connections with bounds, shared by the OTLP/HTTP receiver and the admin API.

What a client can hold, and for how long:

- a connection that has sent nothing waits in one selector (no thread) for `read_timeout`, at
  most `_MAX_PENDING` of them (the oldest is closed past that), so idle connections cost a
  file descriptor, never a thread;
- a connection that has sent its first byte gets a thread from `slots`; past them one of a few
  spare threads answers "busy" (503 + Retry-After) and closes; past those it is closed unread;
- a request must deliver its headers and body within `read_timeout` of its first byte
  (slowloris senders are cut off with 408 and counted, reason read_timeout);
- an answered keep-alive connection waits `idle_timeout` for its next request, not at all when
  more than half the slots are taken.

Every refusal is reported through the `overload(reason)` callback (a metric).
"""

from __future__ import annotations

import contextlib
import io
import selectors
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any, cast

import structlog

from pathwatch.access import AccessConfigError, TlsFiles

log = structlog.get_logger(component="http")

_MAX_PENDING = 512  # connections waiting (threadless) for their first byte
_SPARE_THREADS = 4  # past every slot, threads that only answer "busy"
_WRITE_TIMEOUT_S = 30.0  # longest stall while an answer is written


def split_listen(listen: str, where: str) -> tuple[str, int]:
    """ "HOST:PORT" (or "[v6]:PORT") as a bind address; OSError naming `where` otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise OSError(f"{where}: {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class DeadlineReader(io.RawIOBase):
    """A socket's input with a deadline per request instead of a timeout per recv.

    Before a request's first byte it waits up to `idle` seconds (a quiet keep-alive, not an
    error); from that byte on the whole request must arrive within `read_timeout`, however it
    is trickled. `expired` says that deadline passed (TimeoutError was raised).
    """

    def __init__(self, sock: socket.socket, idle: float, read_timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self.idle = idle
        self._read_timeout = read_timeout
        self._deadline: float | None = None
        self._quiet = False
        self.expired = False

    def readable(self) -> bool:
        return True

    def begin_request(self) -> None:
        self._deadline, self._quiet, self.expired = None, False, False

    def drain_for(self, seconds: float) -> None:
        """Read what the client still sends for `seconds` more, without it counting as a
        slow request (after an early answer)."""
        self._deadline, self._quiet = time.monotonic() + seconds, True

    def readinto(self, buffer: Any) -> int:
        now = time.monotonic()
        if self._deadline is None:
            timeout = self.idle
        else:
            timeout = self._deadline - now
            if timeout <= 0:
                self.expired = not self._quiet
                raise TimeoutError("the request did not arrive within the read timeout")
        self._sock.settimeout(timeout)
        try:
            n = self._sock.recv_into(buffer)
        except TimeoutError:
            self.expired = self._deadline is not None and not self._quiet
            raise
        if n and self._deadline is None:
            self._deadline = now + self._read_timeout
        return n


class BoundedHandler(BaseHTTPRequestHandler):
    """A request handler whose reads obey the server's deadlines. Subclasses answer a request
    that timed out with `answer_timeout` (408 in their own format) and a refused connection
    with `answer_busy`."""

    protocol_version = "HTTP/1.1"
    server_version = "pathwatch"
    reader: DeadlineReader
    _answered = False

    @property
    def bounded(self) -> BoundedHttpServer:
        return cast(BoundedHttpServer, self.server)

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def setup(self) -> None:
        super().setup()
        srv = self.bounded
        self.reader = DeadlineReader(self.connection, srv.idle_timeout, srv.read_timeout)
        self.rfile = io.BufferedReader(self.reader, 1 << 16)

    def handle_one_request(self) -> None:
        self.reader.begin_request()
        self._answered = False
        try:
            super().handle_one_request()  # ends the connection on TimeoutError
        except TimeoutError:
            self.close_connection = True
        if self.reader.expired:
            self.close_connection = True
            self.bounded.overload("read_timeout")
            if not self._answered:
                with contextlib.suppress(OSError, ValueError):
                    self.answer_timeout()
        elif not self.bounded.keep_alive():
            self.close_connection = True

    def send_response(self, code: int, message: str | None = None) -> None:
        self._answered = True
        self.connection.settimeout(_WRITE_TIMEOUT_S)
        super().send_response(code, message)

    def answer_timeout(self) -> None:
        self.close_connection = True
        self.send_error(408, "request not received within the read timeout")

    def answer_busy(self) -> None:
        self.close_connection = True
        self.send_error(503, "serving the maximum number of connections")


class BoundedHttpServer(socketserver.TCPServer):
    """The listening socket, the threadless wait for a first byte, the thread slots, TLS per
    connection with the current certificate (re-read when its files change), and a bounded
    shutdown. `handler` serves a connection in a slot; `busy` (a handler class whose
    requests all call `answer_busy`) serves one on a spare thread."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BoundedHandler],
        busy: type[BoundedHandler],
        *,
        slots: int,
        read_timeout: float,
        idle_timeout: float,
        overload: Callable[[str], None],
        tls: TlsFiles | None = None,
        name: str = "pathwatch-http",
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.capacity = max(1, slots)
        self.read_timeout = float(read_timeout)
        self.idle_timeout = min(float(idle_timeout), self.read_timeout)
        self.overload = overload
        self._busy = busy
        self._name = name
        self._slots = threading.BoundedSemaphore(self.capacity)
        self._spare = threading.BoundedSemaphore(_SPARE_THREADS)
        self._cond = threading.Condition()
        self._open: set[socket.socket] = set()
        self._inflight = 0
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self.closing = False
        self._tls = tls
        self._context: ssl.SSLContext | None = None
        self._watch: Any = None
        if tls is not None:
            self._watch = tls.watcher()
            self._watch.changed()
            self._context = tls.server_context()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "pathwatch", self.server_address[1]

    # -- accepting --------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.2) -> None:
        """Accept until `stop`; connections wait here, threadless, for their first byte."""
        self._stopped.clear()
        self.socket.setblocking(False)
        pending: dict[socket.socket, tuple[Any, float]] = {}  # oldest first
        with selectors.DefaultSelector() as sel:
            sel.register(self.socket, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    wait = poll_interval
                    if pending:
                        oldest = next(iter(pending.values()))[1]
                        wait = min(wait, max(0.0, oldest - time.monotonic()))
                    for key, _ in sel.select(wait):
                        conn = cast(socket.socket, key.fileobj)
                        if conn is self.socket:
                            self._accept(sel, pending)
                        else:
                            sel.unregister(conn)
                            address, _ = pending.pop(conn)
                            self._dispatch(conn, address)
                    now = time.monotonic()
                    while pending:
                        conn, (_, deadline) = next(iter(pending.items()))
                        if deadline > now:
                            break
                        self._drop(sel, pending, conn, "read_timeout")
            finally:
                for conn in list(pending):
                    self._drop(sel, pending, conn, None)
                self._stopped.set()

    def _accept(self, sel: selectors.BaseSelector, pending: dict[socket.socket, Any]) -> None:
        try:
            conn, address = self.socket.accept()
        except OSError:  # gone before we got to it, or out of descriptors: the client retries
            return
        conn.setblocking(True)
        if len(pending) >= _MAX_PENDING:
            self._drop(sel, pending, next(iter(pending)), "connections")
        pending[conn] = (address, time.monotonic() + self.read_timeout)
        sel.register(conn, selectors.EVENT_READ)

    def _drop(
        self,
        sel: selectors.BaseSelector,
        pending: dict[socket.socket, Any],
        conn: socket.socket,
        reason: str | None,
    ) -> None:
        sel.unregister(conn)
        del pending[conn]
        if reason is not None:
            self.overload(reason)
        with contextlib.suppress(OSError):
            conn.close()

    def _dispatch(self, conn: socket.socket, address: Any) -> None:
        if self._slots.acquire(blocking=False):
            handler: type[BoundedHandler] = cast(type[BoundedHandler], self.RequestHandlerClass)
            release = self._slots.release
        elif self._spare.acquire(blocking=False):
            self.overload("connections")
            handler, release = self._busy, self._spare.release
        else:
            self.overload("connections")  # past every bound: a closed connection, retried
            with contextlib.suppress(OSError):
                conn.close()
            return
        try:
            threading.Thread(
                target=self._serve,
                args=(conn, address, handler, release),
                name=self._name,
                daemon=True,
            ).start()
        except RuntimeError:  # no thread to be had: same as past every bound
            release()
            with contextlib.suppress(OSError):
                conn.close()

    def _wrap(self, conn: socket.socket) -> socket.socket:
        if self._tls is None:
            return conn
        if self._watch.changed():
            try:
                self._context = self._tls.server_context()
                log.info("reloaded TLS certificate", listener=self._tls.where)
            except AccessConfigError as exc:
                log.error("cannot reload TLS files; keeping the current ones", error=str(exc))
        assert self._context is not None
        tls_conn = self._context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        tls_conn.settimeout(self.read_timeout)  # a handshake that never ends is cut off too
        tls_conn.do_handshake()
        return tls_conn

    def _serve(
        self,
        conn: socket.socket,
        address: Any,
        handler: type[BoundedHandler],
        release: Callable[[], Any],
    ) -> None:
        request = conn
        with self._cond:
            self._open.add(conn)
        try:
            request = self._wrap(conn)
            with self._cond:
                self._open.discard(conn)
                self._open.add(request)
            handler(request, address, self)
        except (OSError, ssl.SSLError) as exc:
            log.debug("http connection ended", server=self._name, error=str(exc))
        except Exception:
            log.exception("http connection failed", server=self._name)
        finally:
            with self._cond:
                self._open.discard(conn)
                self._open.discard(request)
            self.shutdown_request(request)
            release()

    # -- lifecycle -------------------------------------------------------------------------

    def keep_alive(self) -> bool:
        """Whether an answered connection may wait for another request: not when shutting
        down, nor when more than half the slots are taken (idle clients must not hog them)."""
        return not self.closing and len(self._open) <= self.capacity // 2

    def begin(self) -> None:
        """An export (work that shutdown waits for) has started."""
        with self._cond:
            self._inflight += 1

    def end(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def shutdown(self) -> None:
        """Stop accepting (and close connections still waiting for their first byte)."""
        self._stop.set()
        self._stopped.wait(5.0)

    def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight work finish for up to `grace` seconds, then cut every
        connection still open (idle keep-alives, or work past the grace)."""
        self.closing = True
        self.shutdown()
        deadline = time.monotonic() + grace
        with self._cond:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            still_open = list(self._open)
        for sock in still_open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.server_close()
