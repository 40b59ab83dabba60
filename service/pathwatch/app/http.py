"""AdminHttpServer: health, readiness, Prometheus metrics and the /api/v1 endpoints.

Low-traffic by design (operators and probes), so a thread per connection is enough, within the
bounds of receiver/_http_transport: idle connections hold no thread, at most
`http.max_concurrent_requests` are served at once (503 + Retry-After past it), and a request must
arrive within `http.read_timeout` (408). Every response is JSON except /metrics; every client
error is 400 with a message that names the problem.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from pathwatch.access import BearerToken, TlsFiles
from pathwatch.alerts.event import parse_rfc3339, rfc3339
from pathwatch.clock import MINUTE_MS
from pathwatch.receiver._http_transport import BoundedHandler, BoundedHttpServer

if TYPE_CHECKING:
    from pathwatch.app.service import Service

log = structlog.get_logger(component="http")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def format_duration(seconds: float) -> str:
    """A duration as the configuration writes it: 30d, 1h, 1m, 1h30m, 90s, 0s."""
    rest = round(seconds)
    if rest != seconds or rest <= 0:
        return f"{seconds:g}s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out


def _bool_param(query: dict[str, list[str]], name: str) -> bool:
    values = query.get(name)
    if not values:
        return False
    value = values[0].strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise ApiError(400, f"{name}={values[0]!r}: expected true or false")


def _query_time(query: dict[str, list[str]], name: str, required: bool) -> int | None:
    values = query.get(name)
    if not values:
        if required:
            raise ApiError(
                400, f"query parameter {name!r} is required (RFC 3339, e.g. 2026-01-01T10:00:00Z)"
            )
        return None
    try:
        return parse_rfc3339(values[0])
    except ValueError as exc:
        raise ApiError(400, f"{name}={values[0]!r} is not an RFC 3339 time: {exc}") from None


class AdminHttpServer:
    def __init__(
        self,
        service: Service,
        listen: str,
        token: BearerToken | None = None,
        tls: TlsFiles | None = None,
        protect_probes: bool = False,
    ) -> None:
        self._service = service
        host, port = split_listen(listen)
        handler = type(
            "Handler",
            (_Handler,),
            {"service": service, "token": token, "protect_probes": protect_probes},
        )
        busy = type("BusyHandler", (_BusyHandler,), {"service": service})
        config = service.config.http
        overload = service.metrics.receiver_overload
        if token is not None:
            token.on_reload_failure = lambda: service.metrics.token_reload_failures.labels(
                listener=token.listener
            ).inc()
        try:
            self._server = BoundedHttpServer(
                (host, port),
                handler,
                busy,
                slots=config.max_concurrent_requests,
                read_timeout=float(config.read_timeout),
                idle_timeout=_IDLE_TIMEOUT_S,
                overload=lambda reason: overload.labels(receiver="admin", reason=reason).inc(),
                tls=tls,
                name="pathwatch-http",
            )
        except OSError as exc:
            raise OSError(f"http.listen: cannot listen on {listen}: {exc.strerror}") from exc
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None
        self._serving = False
        self._announced = False

    def start(self) -> None:
        """Serve on a plain thread (the service runs `run` under its Supervisor)."""
        self._thread = threading.Thread(
            target=self.run, args=(threading.Event(),), name="pathwatch-http", daemon=True
        )
        self._thread.start()

    def run(self, stop: threading.Event) -> None:
        """The accept loop; returns after shutdown(). An unexpected error escapes for the
        Supervisor, which serves again on the same socket."""
        if not self._announced:
            self._announced = True
            log.info("admin http listening", port=self.port)
        self._serving = True
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._serving = False

    def shutdown(self) -> None:
        """Stop accepting; requests being answered finish on their own threads. Safe twice."""
        self._server.shutdown()  # bounded; a loop that starts later stops at once
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self._server.server_close()


_IDLE_TIMEOUT_S = 5.0  # an answered keep-alive connection waits this long for the next request
_MAX_BODY = 1 << 20  # no endpoint reads a body; one this large is drained, past it refused
_MAX_UPLOAD = 4 << 30  # POST /api/v1/baseline: a baseline file, spooled to disk
_UPLOAD = ("POST", "/api/v1/baseline")


class _Handler(BoundedHandler):
    upload_length = 0  # POST /api/v1/baseline: body bytes its handler reads
    service: Service
    token: BearerToken | None
    protect_probes: bool

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http request", request=format % args)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._send(status, json.dumps(data, indent=None).encode() + b"\n", headers=headers)

    def answer_timeout(self) -> None:
        self.close_connection = True
        self._json(408, {"error": "the request did not arrive within http.read_timeout"})

    def answer_busy(self) -> None:
        self.close_connection = True
        self._json(
            503,
            {"error": "pathwatch is serving its maximum of admin connections; retry"},
            headers=(("Retry-After", "1"),),
        )

    def _body_length(self, limit: int = _MAX_BODY) -> int:
        """The declared body length; ApiError 400 when it is not a non-negative integer, 413
        past `limit` (both close the connection: the body's end is unknown or unread)."""
        raw = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "Content-Length is required (chunked bodies are not accepted)")
        if raw is None:
            return 0
        text = raw.strip()
        if not text.isdigit():
            self.close_connection = True
            raise ApiError(400, f"malformed Content-Length {raw[:40]!r}")
        length = int(text)
        if length > limit:
            self.close_connection = True
            raise ApiError(413, f"request body of {length} bytes exceeds {limit}")
        return length

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        upload = (method, url.path) == _UPLOAD
        try:
            length = self._body_length(_MAX_UPLOAD if upload else _MAX_BODY)
            if length and not upload:
                self.rfile.read(length)  # within http.read_timeout of the first byte
        except ApiError as exc:
            self._json(exc.status, {"error": str(exc)})
            return
        # An upload is read by its handler, after authentication; unread, the connection
        # cannot be reused.
        self.upload_length = length if upload else 0
        if upload:
            self.close_connection = True
        try:
            # The console checks the same token itself (also from its sign-in cookie).
            guarded = url.path.startswith("/api/") or (
                self.protect_probes and not url.path.startswith("/console")
            )
            if (
                guarded
                and self.token is not None
                and not self.token.accepts(self.headers.get("Authorization"))
            ):
                raise ApiError(401, "missing or invalid bearer token")
            route = _ROUTES.get((method, url.path))
            if route is not None:
                route(self, query)
                return
            parts = url.path.strip("/").split("/")
            if (
                method == "POST"
                and len(parts) == 5
                and parts[:3] == ["api", "v1", "rules"]
                and parts[4] == "evaluate"
            ):
                self._evaluate(parts[3], query)
                return
            raise ApiError(404, f"no such endpoint: {method} {url.path}")
        except ApiError as exc:
            if exc.status == 401:
                body = json.dumps({"error": str(exc)}).encode() + b"\n"
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Bearer realm="pathwatch"')
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self._json(exc.status, {"error": str(exc)})
        except Exception as exc:
            log.exception("admin api error", path=url.path)
            self._json(500, {"error": f"internal error: {exc}"})

    def do_GET(self) -> None:  # noqa: N802 (http.server calls do_<METHOD>)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 (http.server calls do_<METHOD>)
        self._dispatch("POST")

    # -- endpoints -------------------------------------------------------------------------

    def _healthz(self, query: dict[str, list[str]]) -> None:
        # Live unless a component that only a new process can cure was given up.
        dead = self.service.supervisor.needs_restart()
        if dead:
            self._json(503, {"status": "failed", "components": dead})
            return
        self._json(200, {"status": "ok"})

    def _readyz(self, query: dict[str, list[str]]) -> None:
        r = self.service.readiness()
        self._json(200 if r.ready else 503, {"ready": r.ready, "checks": r.checks})

    def _sinks(self, query: dict[str, list[str]]) -> None:
        svc = self.service
        assert svc.alerts is not None
        out = []
        for status in svc.dispatcher.statuses() if svc.dispatcher is not None else []:
            dead = sum(1 for _ in svc.alerts.deadletters(status.name, [status.name]))
            out.append(
                {
                    "name": status.name,
                    "type": status.type,
                    "disabled": status.disabled,
                    "outbox_depth": status.depth,
                    "oldest_age_seconds": round(status.oldest_age_s, 3),
                    "deadletters": dead,
                }
            )
        self._json(200, {"sinks": out})

    def _baseline_export(self, query: dict[str, list[str]]) -> None:
        """GET /api/v1/baseline[?cluster=NAME][&rule=ID...]: the baseline file (the format of
        `pathwatch baseline export`), of one cluster when named: what moves with it."""
        import tempfile

        from pathwatch.app.baseline import ClusterScope, export_baseline
        from pathwatch.rules.model import CLUSTER_FIELD, HOST_FIELD
        from pathwatch.store.writer import Backpressure

        svc = self.service
        assert svc.db is not None
        rules = query.get("rule", [])
        unknown = [r for r in rules if r not in {x.id for x in svc.rules}]
        if unknown:
            raise ApiError(400, f"unknown rule {unknown[0]!r}")
        scope = None
        if query.get("cluster"):
            positions = {
                r.id: (
                    r.key_fields.index(CLUSTER_FIELD),
                    r.key_fields.index(HOST_FIELD) if HOST_FIELD in r.key_fields else None,
                )
                for r in svc.rules
                if CLUSTER_FIELD in r.key_fields
            }
            scope = ClusterScope(query["cluster"][0], positions)
        if svc.writer is not None:
            # The export reads records directly: minutes logged so far go into them first.
            try:
                svc.writer.run_exclusive(lambda: None, timeout=600.0)
            except (Backpressure, TimeoutError) as exc:
                raise ApiError(503, f"not exported now, retry: {exc}") from None
        with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool:
            keys = export_baseline(svc.db, spool, rules, scope)  # type: ignore[arg-type]
            size = spool.tell()
            spool.seek(0)
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(size))
            self.send_header("X-Pathwatch-Keys", str(keys))
            self.end_headers()
            while chunk := spool.read(1 << 20):
                self.wfile.write(chunk)

    def _baseline_import(self, query: dict[str, list[str]]) -> None:
        """POST /api/v1/baseline with a baseline file as the body: merged into the running
        store on the writer thread, idempotently (importing it again changes nothing)."""
        import tempfile

        from pathwatch.app.baseline import import_baseline
        from pathwatch.store.writer import Backpressure

        svc = self.service
        assert svc.db is not None and svc.writer is not None and svc.firstseen is not None
        db, store = svc.db, svc.firstseen
        if not self.upload_length:
            raise ApiError(400, "send the baseline file as the request body")
        with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool:
            left = self.upload_length
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    raise ApiError(400, "the request body ended early")
                spool.write(chunk)
                left -= len(chunk)
            spool.seek(0)

            def merge() -> int:
                try:
                    merged = import_baseline(
                        db,
                        spool,  # type: ignore[arg-type]
                        svc.retention,
                        svc.clock.now_ms(),
                    )
                    store.context.recount()  # imported context rows came without counts
                    return merged
                finally:
                    store.forget_cached()  # the merge rewrote records behind the caches
                    svc.durable.clear()

            try:
                merged = svc.writer.run_exclusive(merge, timeout=600.0)
            except ValueError as exc:
                raise ApiError(400, f"not imported: {exc}") from None
            except (Backpressure, TimeoutError) as exc:
                raise ApiError(503, f"not imported now, retry: {exc}") from None
        self._json(200, {"imported": merged})

    def _quarantine(self, query: dict[str, list[str]]) -> None:
        svc = self.service
        assert svc.firstseen is not None
        self._json(200, {"quarantined": svc.firstseen.quarantined()})

    def _metrics(self, query: dict[str, list[str]]) -> None:
        self._send(200, self.service.metrics.exposition(), CONTENT_TYPE_LATEST)

    def _rules(self, query: dict[str, list[str]]) -> None:
        svc = self.service
        assert svc.alerts is not None
        out = []
        for rule in svc.rules:
            last = svc.alerts.last_tick(rule.id) if rule.enabled else None
            out.append(
                {
                    "id": rule.id,
                    "name": rule.name,
                    "enabled": rule.enabled,
                    "key_fields": list(rule.key_fields),
                    "metrics": list(rule.metrics),
                    "window": format_duration(rule.window_minutes * 60),
                    "baseline_length": format_duration(rule.baseline_minutes * 60),
                    "schedule": rule.schedule,
                    "mode": rule.mode,
                    "suppress_for": format_duration(rule.suppress_for_minutes * 60),
                    "baseline": svc.baseline_status(rule) if rule.enabled else None,
                    "no_baseline": rule.no_baseline,
                    # Clusters the last tick found without any history before its window.
                    "clusters_without_baseline": svc.runner.clusters_without_baseline.get(
                        rule.id, []
                    )
                    if svc.runner is not None
                    else [],
                    # The rule's last tick error, kept until a tick of that rule succeeds.
                    "last_error": svc.scheduler.rule_errors.get(rule.id)
                    if svc.scheduler is not None
                    else None,
                    "delay": format_duration(rule.delay_seconds),
                    "delay_seconds": rule.delay_seconds,
                    "risk_score": rule.risk.score,
                    "exclude": [{"field": e.field, e.kind: e.pattern} for e in rule.exclude],
                    "last_tick": None
                    if last is None
                    else {
                        "time": rfc3339(last.tick_ms),
                        "evaluated_at": rfc3339(last.evaluated_ms),
                        "alerts": len(last.alert_ids),
                        "excluded": last.excluded,
                    },
                }
            )
        self._json(200, {"rules": out})

    def _alerts(self, query: dict[str, list[str]]) -> None:
        svc = self.service
        assert svc.alerts is not None
        since = _query_time(query, "since", required=False)
        if since is None:
            since = svc.clock.now_ms() - 24 * 3_600_000
        limit = _int_param(query, "limit", 1000, 10_000)
        self._json(200, {"alerts": svc.alerts.alerts_since(since, limit)})

    def _evaluate(self, rule_id: str, query: dict[str, list[str]]) -> None:
        svc = self.service
        rule = next((r for r in svc.rules if r.id == rule_id), None)
        if rule is None:
            known = ", ".join(r.id for r in svc.rules)
            raise ApiError(400, f"unknown rule {rule_id!r} (rules: {known})")
        dry_run = _bool_param(query, "dry_run")
        now = svc.clock.now_ms()
        # A dry run defaults to the next whole minute: its window holds everything received.
        at = _query_time(query, "at", required=not dry_run)
        if at is None:
            at = now - now % MINUTE_MS + MINUTE_MS
        assert svc.runner is not None
        if at % MINUTE_MS:
            raise ApiError(400, f"at={rfc3339(at)} must be a whole minute (seconds = 0)")
        if at > now + (MINUTE_MS if dry_run else 0):
            raise ApiError(
                400, f"at={rfc3339(at)} is in the future: its window is not complete yet"
            )
        from pathwatch.app.service import INDEX_EXTRA_MINUTES

        oldest = now - INDEX_EXTRA_MINUTES * MINUTE_MS
        if at < oldest:
            raise ApiError(
                400,
                f"at={rfc3339(at)} is older than the activity index keeps (from {rfc3339(oldest)})",
            )
        from pathwatch.scheduler.runner import TickNotReady

        try:
            outcome = svc.runner.run(rule, at, dry_run=dry_run)
        except TickNotReady as exc:
            raise ApiError(400, str(exc)) from None
        body: dict[str, object] = {"alerts": outcome.alerts, "new": outcome.new}
        if dry_run:
            body["dry_run"] = True
            body["tick"] = rfc3339(at)
        self._json(200, body)

    def _keys(self, query: dict[str, list[str]]) -> None:
        from pathwatch.app.inspect import search_keys

        svc = self.service
        assert svc.firstseen is not None
        rule_id = (query.get("rule") or [svc.rules[0].id])[0]
        rule = next((r for r in svc.rules if r.id == rule_id), None)
        if rule is None:
            raise ApiError(400, f"unknown rule {rule_id!r}")
        limit = _int_param(query, "limit", 100, 10_000)
        path = query["path"][0] if query.get("path") else None
        name = query["name"][0] if query.get("name") else None
        out = []
        try:
            for view in search_keys(svc.firstseen, rule, path, name):
                out.append(view)
                if len(out) >= limit:
                    break
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        self._json(200, {"keys": out})

    def _deadletters(self, query: dict[str, list[str]]) -> None:
        svc = self.service
        assert svc.alerts is not None
        sink = _sink_param(svc, query)
        limit = _int_param(query, "limit", 1000, 10_000)
        out = []
        for d in svc.alerts.deadletters(sink, [s.name for s in svc.config.sinks]):
            out.append(
                {
                    "sink": d.sink,
                    "seq": d.seq,
                    "alert_id": d.alert_id,
                    "reason": d.record.get("reason"),
                    "attempts": d.record.get("attempts", 0),
                    "event": d.event,
                }
            )
            if len(out) >= limit:
                break
        self._json(200, {"deadletters": out})

    def _redrive(self, query: dict[str, list[str]]) -> None:
        svc = self.service
        assert svc.alerts is not None and svc.dispatcher is not None
        sink = _sink_param(svc, query)
        moved = svc.alerts.redrive(sink, [s.name for s in svc.config.sinks])
        svc.dispatcher.notify(full=True)
        log.info("dead letters redriven", sink=sink or "all", count=moved)
        self._json(200, {"redriven": moved})

    def _console(self, query: dict[str, list[str]]) -> None:
        """The alert console (HTML, rendered by app/console.py, which also checks access)."""
        import ssl

        from pathwatch.app.console import handle

        page = handle(
            self.service,
            self.token,
            urlsplit(self.path).path,
            query,
            self.headers.get("Authorization"),
            self.headers.get("Cookie"),
            secure=isinstance(self.connection, ssl.SSLSocket),
        )
        if page.redact is not None:  # ?token= was in the request line: keep it out of logs
            self.requestline = page.redact(self.requestline)
        self._send(page.status, page.body, page.content_type, page.headers)


class _BusyHandler(_Handler):
    """Runs on a spare thread when every slot is taken: answers 503 and closes."""

    def _dispatch(self, method: str) -> None:
        self.answer_busy()


def _int_param(query: dict[str, list[str]], name: str, default: int, maximum: int) -> int:
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError:
        raise ApiError(400, f"{name}={values[0]!r} is not an integer") from None
    if not 1 <= value <= maximum:
        raise ApiError(400, f"{name} must be between 1 and {maximum}")
    return value


def _sink_param(svc: Service, query: dict[str, list[str]]) -> str | None:
    values = query.get("sink")
    if not values:
        return None
    names = [s.name for s in svc.config.sinks]
    if values[0] not in names:
        raise ApiError(400, f"unknown sink {values[0]!r} (sinks: {', '.join(names) or 'none'})")
    return values[0]


_ROUTES = {
    ("GET", "/healthz"): _Handler._healthz,
    ("GET", "/readyz"): _Handler._readyz,
    ("GET", "/api/v1/quarantine"): _Handler._quarantine,
    ("GET", "/api/v1/baseline"): _Handler._baseline_export,
    ("POST", "/api/v1/baseline"): _Handler._baseline_import,
    ("GET", "/api/v1/sinks"): _Handler._sinks,
    ("GET", "/metrics"): _Handler._metrics,
    ("GET", "/api/v1/rules"): _Handler._rules,
    ("GET", "/api/v1/alerts"): _Handler._alerts,
    ("GET", "/api/v1/keys"): _Handler._keys,
    ("GET", "/api/v1/deadletters"): _Handler._deadletters,
    ("POST", "/api/v1/deadletters/redrive"): _Handler._redrive,
    ("GET", "/console"): _Handler._console,
    ("GET", "/console/key"): _Handler._console,
}

__all__ = ["AdminHttpServer", "ApiError", "HTTPStatus"]
