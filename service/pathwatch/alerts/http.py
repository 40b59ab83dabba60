"""HttpPoster: one POST to a sink with TLS settings, classified once: ok, retry, permanent, gone.

Classification (the delivery contract): 2xx ok; 408, 429, 5xx, connection errors and timeouts
retry (honouring Retry-After, in seconds or as an HTTP date); 410 Gone disables the sink; any other
status is a permanent failure (redirects included: they are not followed).

Connections are kept alive and reused, one request at a time each, with the sink's timeout for
connecting and for every read. A connection that fails, times out, or is left with an unread
answer is closed, never reused. The proxy settings of the environment (``https_proxy``,
``http_proxy``, ``no_proxy``) apply as they do for urllib.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import http.client
import select
import socket
import ssl
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Literal

from pathwatch import __version__
from pathwatch.clock import Clock
from pathwatch.config.model import SinkConfig

Outcome = Literal["ok", "retry", "permanent", "gone"]
_MAX_ERROR_BODY = 2048
_MAX_BODY = 65_536  # an answer longer than this is not read to its end: its connection is closed
_USER_AGENT = f"pathwatch/{__version__}"


@dataclass(frozen=True, slots=True)
class HttpRequest:
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    detail: str
    status: int | None = None
    retry_after: float | None = None


def parse_retry_after(value: str | None, now_ms: int) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now_ms / 1000)


def classify(status: int, retry_after: float | None, detail: str) -> SendResult:
    if 200 <= status < 300:
        return SendResult("ok", f"HTTP {status}", status)
    if status == 410:
        return SendResult("gone", f"HTTP 410 Gone: {detail}", status)
    if status in (408, 429) or status >= 500:
        return SendResult("retry", f"HTTP {status}: {detail}", status, retry_after)
    return SendResult("permanent", f"HTTP {status}: {detail}", status)


def _ssl_context(config: SinkConfig) -> ssl.SSLContext | None:
    if not config.url.startswith("https://"):
        return None
    ctx = ssl.create_default_context(cafile=config.ca_file)
    if config.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if config.cert_file:
        ctx.load_cert_chain(config.cert_file, config.key_file)
    return ctx


@dataclass(frozen=True, slots=True)
class _Route:
    """Where a connection goes: the origin, or the proxy that reaches it."""

    scheme: str
    host: str
    port: int
    proxy: tuple[str, int, dict[str, str]] | None = None  # host, port, headers for the proxy


def _route(url: str, proxies: dict[str, str]) -> tuple[_Route, str]:
    """The route to `url` and the request target to send. Raises ValueError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    proxy_url = proxies.get(parts.scheme)
    if not proxy_url or urllib.request.proxy_bypass(parts.hostname):
        return _Route(parts.scheme, parts.hostname, port), target
    proxy = urllib.parse.urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
    if not proxy.hostname:
        raise ValueError(f"unusable proxy setting {proxy_url!r}")
    auth: dict[str, str] = {}
    if proxy.username:
        creds = (
            f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
        )
        auth["Proxy-Authorization"] = "Basic " + base64.b64encode(creds.encode()).decode()
    via = (proxy.hostname, proxy.port or 80, auth)
    if parts.scheme == "http":  # plain HTTP through a proxy: absolute-form target
        target = urllib.parse.urlunsplit(parts._replace(fragment=""))
    return _Route(parts.scheme, parts.hostname, port, via), target


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """True when an idle connection was closed by its server (readable means EOF, or bytes
    nobody asked for: either way it cannot carry another request)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        poller = select.poll()  # not select(): it fails on descriptors past 1023
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _ack_quickly(conn: http.client.HTTPConnection) -> None:
    """Acknowledge the answer's segments at once. A server that writes its status line and its
    body in two sends (Python's http.server does) holds the body back under Nagle's algorithm
    until the first is acknowledged, and a delayed ACK takes 40 ms: every request on a reused
    connection would wait that long. Linux only; the setting lasts a few segments, hence per
    request."""
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None and conn.sock is not None:
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


class HttpPoster:
    """Sends requests for one sink over kept-alive connections. Thread-safe: each request has a
    connection to itself; at most `max_idle` idle ones are kept. Raises nothing for network or
    protocol failures: those are SendResults. `close` closes the idle connections."""

    def __init__(self, config: SinkConfig, clock: Clock, max_idle: int = 4) -> None:
        self._config = config
        self._clock = clock
        self._ctx = _ssl_context(config)
        self._max_idle = max(1, max_idle)
        self._idle: list[tuple[_Route, http.client.HTTPConnection]] = []
        self._lock = threading.Lock()
        self._proxies = urllib.request.getproxies()  # read once, as urllib's ProxyHandler does

    def _connect(self, route: _Route) -> http.client.HTTPConnection:
        timeout = float(self._config.timeout)
        host, port = (route.proxy[0], route.proxy[1]) if route.proxy else (route.host, route.port)
        conn: http.client.HTTPConnection
        if route.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._ctx)
            if route.proxy:
                conn.set_tunnel(route.host, route.port, headers=route.proxy[2])
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        return conn

    def _checkout(self, route: _Route) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection on `route` (True), or a new one, not connected yet (False)."""
        while True:
            with self._lock:
                same = [i for i, (r, _) in enumerate(self._idle) if r == route]
                conn = self._idle.pop(same[-1])[1] if same else None
            if conn is None:
                return self._connect(route), False
            if not _dropped(conn):
                return conn, True
            conn.close()

    def _checkin(self, route: _Route, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append((route, conn))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, conn in idle:
            conn.close()

    def post(self, request: HttpRequest) -> SendResult:
        try:
            route, target = _route(request.url, self._proxies)
        except ValueError as exc:
            return SendResult("permanent", str(exc))
        headers = {"User-Agent": _USER_AGENT, **self._config.headers, **request.headers}
        if route.proxy and route.scheme == "http":
            headers.update(route.proxy[2])
        while True:
            conn, reused = self._checkout(route)
            try:
                return self._exchange(route, conn, target, request.body, headers)
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
                if not reused:
                    return SendResult("retry", f"connection failed: {exc}")
                # The server closed this kept-alive connection while it sat idle (the race
                # `_dropped` cannot see): send again on another connection, as HTTP clients
                # do. This ends: each pass takes an idle connection out of the pool or, at
                # last, opens a new one, whose failure is an ordinary retry.

    def _exchange(
        self,
        route: _Route,
        conn: http.client.HTTPConnection,
        target: str,
        body: bytes,
        headers: dict[str, str],
    ) -> SendResult:
        """One request on `conn`; `conn` goes back to the pool only after a complete answer.
        Re-raises a reset on a reused connection (the caller opens a new one)."""
        done = False
        try:
            conn.request("POST", target, body=body, headers=headers)
            _ack_quickly(conn)
            resp = conn.getresponse()
            text = resp.read(_MAX_BODY)
            done = resp.isclosed() and not resp.will_close
        except TimeoutError:
            return SendResult("retry", f"timed out after {self._config.timeout:g}s")
        except ssl.SSLEOFError as exc:  # the TLS form of a connection closed by the server
            raise ConnectionAbortedError(str(exc)) from exc
        except ssl.SSLError as exc:
            return SendResult("retry", f"TLS error: {exc}")
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            raise
        except OSError as exc:
            return SendResult("retry", f"connection failed: {exc}")
        except http.client.HTTPException as exc:
            return SendResult("retry", f"bad answer: {type(exc).__name__}: {exc}")
        finally:
            if done:
                self._checkin(route, conn)
            else:
                conn.close()
        if 200 <= resp.status < 300:
            return classify(resp.status, None, "")
        detail = text[:_MAX_ERROR_BODY].decode("utf-8", "replace").strip()
        retry_after = parse_retry_after(resp.getheader("Retry-After"), self._clock.now_ms())
        return classify(resp.status, retry_after, detail or resp.reason)
