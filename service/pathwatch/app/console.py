"""The alert console: read-only HTML pages for analysts, served by the admin API.

GET /console lists recent alerts (newest first) with their context and key fields, filtered
server-side by rule, host and path (a plain GET form), then the rules with their baseline
status and the sinks with their outbox depth and dead letters. GET /console/key shows one
key's presence history as a timeline (inline SVG) with its runs and its recent alerts.

Everything is rendered here, on the server: no JavaScript, no external asset (an air-gapped
cluster serves it as well as a laptop), and a Content-Security-Policy that allows neither
scripts nor any fetch. Alert fields are attacker-controlled (a path is whatever a process
claims), so every value goes through `_e`: control and bidi characters are made visible
(`display_safe`), then HTML-escaped.

Access: when the admin API has a bearer token, the console needs it too. A browser cannot
easily send an Authorization header, so it is also accepted once as ``?token=``: the answer is
a redirect to the same page without it, setting an HttpOnly, SameSite=Strict cookie scoped to
/console (Secure over TLS, gone when the browser closes) that carries the token from then on.
The cookie is only good for /console: /api/ still wants the header.
"""

from __future__ import annotations

import fnmatch
import html
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode

from pathwatch.alerts.event import rfc3339
from pathwatch.alerts.suspicious import display_safe, suspicion
from pathwatch.clock import MINUTE_MS
from pathwatch.rules.model import HOST_FIELD, Rule
from pathwatch.store.codec import KeyState, RecordFormatError

if TYPE_CHECKING:
    from pathwatch.access import BearerToken
    from pathwatch.app.service import Service

COOKIE = "pathwatch_console"
TOKEN_PARAM = "token"
DAY_MS = 1440 * MINUTE_MS
TIMELINE_DAYS = 30
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_HOURS = 24 * 31
SCAN_CAP = 20_000  # alerts decoded per look at the alert log (bounds one page's work)
_LISTS = ("keys", "refused_keys", "suppressed_keys")  # summaries list (host, path) pairs

_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = (
    ("Content-Security-Policy", _CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
)


class ConsoleError(ValueError):
    """A bad query parameter: a 400 page naming it."""


@dataclass
class Page:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    # Set when the request line carried the token: rewrites it before anything logs it.
    redact: Callable[[str], str] | None = None
    content_type: str = "text/html; charset=utf-8"


# -- access -------------------------------------------------------------------------------


def _cookie_value(header: str | None) -> str | None:
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE:
            return unquote(value.strip().strip('"'))
    return None


def handle(
    svc: Service,
    token: BearerToken | None,
    path: str,
    query: dict[str, list[str]],
    authorization: str | None,
    cookie: str | None,
    secure: bool,
) -> Page:
    """Answers GET /console and /console/key, access included."""
    presented = query[TOKEN_PARAM][0] if query.get(TOKEN_PARAM) else None
    if token is not None and token.enabled:
        if presented is not None:
            secret = presented

            def redact(line: str) -> str:
                return line.replace(quote(secret, safe=""), "***").replace(secret, "***")

            if not token.accepts(f"Bearer {presented}"):
                page = _denied("That token is not the admin API's token.")
                page.redact = redact
                return page
            rest = [(k, v) for k, vs in query.items() if k != TOKEN_PARAM for v in vs]
            location = path + ("?" + urlencode(rest) if rest else "")
            attrs = "Path=/console; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
            return Page(
                303,
                _document("Signed in", f'<p><a href="{_e(location)}">continue</a></p>'),
                (
                    ("Location", location),
                    ("Set-Cookie", f"{COOKIE}={quote(presented, safe='')}; {attrs}"),
                    *_HEADERS,
                ),
                redact,
            )
        from_cookie = _cookie_value(cookie)
        if not token.accepts(authorization) and not (
            from_cookie and token.accepts(f"Bearer {from_cookie}")
        ):
            return _denied(None)
    elif presented is not None:
        # No token configured: nothing to check, but keep a pasted secret out of the logs.
        secret = presented
        page = _render(svc, path, query)
        page.redact = lambda line: line.replace(quote(secret, safe=""), "***").replace(
            secret, "***"
        )
        return page
    return _render(svc, path, query)


def _render(svc: Service, path: str, query: dict[str, list[str]]) -> Page:
    try:
        body = key_page(svc, query) if path == "/console/key" else console_page(svc, query)
    except ConsoleError as exc:
        body = _document("Bad request", f'<p class="err">{_e(exc)}</p><p>{_home()}</p>')
        return Page(400, body, _HEADERS)
    return Page(200, body, _HEADERS)


def _denied(reason: str | None) -> Page:
    why = f"<p class='err'>{_e(reason)}</p>" if reason else ""
    body = _document(
        "Sign in",
        why + "<p>The alert console needs the admin API's bearer token. Open "
        "<code>/console?token=&lt;token&gt;</code> once: the console then keeps it in a cookie "
        "for this browser session (HttpOnly, SameSite=Strict, for /console only) and drops it "
        "from the address.</p>",
    )
    return Page(401, body, (("WWW-Authenticate", 'Bearer realm="pathwatch"'), *_HEADERS))


# -- query parameters ---------------------------------------------------------------------


def _text(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    return values[0].strip() if values else ""


def _int(query: dict[str, list[str]], name: str, default: int, maximum: int) -> int:
    text = _text(query, name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConsoleError(f"{name}={text!r} is not an integer") from None
    if not 1 <= value <= maximum:
        raise ConsoleError(f"{name} must be between 1 and {maximum}")
    return value


def matcher(pattern: str) -> Callable[[str], bool]:
    """A shell glob when `pattern` has * ? or [, otherwise a substring (both case-sensitive)."""
    if any(c in pattern for c in "*?["):
        return lambda value: fnmatch.fnmatchcase(value, pattern)
    return lambda value: pattern in value


@dataclass
class Filters:
    rule: str = ""
    host: str = ""
    path: str = ""
    hours: int = 24
    limit: int = DEFAULT_LIMIT
    _host: Callable[[str], bool] | None = field(default=None, repr=False)
    _path: Callable[[str], bool] | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, query: dict[str, list[str]], rule_ids: Iterable[str]) -> Filters:
        rule = _text(query, "rule")
        known = list(rule_ids)
        if rule and rule not in known:
            raise ConsoleError(f"unknown rule {rule!r} (rules: {', '.join(known)})")
        f = cls(
            rule=rule,
            host=_text(query, "host"),
            path=_text(query, "path"),
            hours=_int(query, "hours", 24, MAX_HOURS),
            limit=_int(query, "limit", DEFAULT_LIMIT, MAX_LIMIT),
        )
        f._host = matcher(f.host) if f.host else None
        f._path = matcher(f.path) if f.path else None
        return f

    def matches(self, alert: dict[str, Any]) -> bool:
        if self.rule and _rule_id(alert) != self.rule:
            return False
        hosts, paths = _hosts_and_paths(alert)
        if self._host is not None and not any(self._host(h) for h in hosts):
            return False
        return self._path is None or any(self._path(p) for p in paths)


def _rule_id(alert: dict[str, Any]) -> str:
    rule = alert.get("rule")
    return str(rule.get("id", "")) if isinstance(rule, dict) else ""


def _fields(alert: dict[str, Any]) -> dict[str, str]:
    fields = alert.get("fields")
    return {str(k): str(v) for k, v in fields.items()} if isinstance(fields, dict) else {}


def _listed(alert: dict[str, Any]) -> list[tuple[str, str]]:
    """The (host, path) pairs a summary event lists."""
    out = []
    for name in _LISTS:
        entries = alert.get(name)
        if isinstance(entries, list):
            for e in entries:
                if isinstance(e, dict):
                    out.append((str(e.get("host", "")), str(e.get("path", ""))))
    return out


def _hosts_and_paths(alert: dict[str, Any]) -> tuple[list[str], list[str]]:
    fields = _fields(alert)
    hosts = [fields["host"]] if "host" in fields else []
    paths = [fields["process.executable.path"]] if "process.executable.path" in fields else []
    for host, path in _listed(alert):
        hosts.append(host)
        paths.append(path)
    return hosts, paths


def recent_alerts(
    svc: Service, since_ms: int, want: int, match: Callable[[dict[str, Any]], bool]
) -> tuple[list[dict[str, Any]], int, bool]:
    """Up to `want` matching alerts since `since_ms`, newest first; the start of the span they
    were searched in, and whether that span is shorter than asked (the alert log holds more
    than SCAN_CAP alerts in it). The log is read oldest first, so the span grows from the
    newest hour backwards (x4 each time) until enough match."""
    assert svc.alerts is not None
    now = svc.clock.now_ms()
    span = 3_600_000
    found: list[dict[str, Any]] = []
    searched_from = now
    while True:
        start = max(since_ms, now - span)
        rows = svc.alerts.alerts_since(start, SCAN_CAP + 1)
        if len(rows) > SCAN_CAP:
            return found[-want:][::-1], searched_from, True
        found = [r for r in rows if match(r)]
        searched_from = start
        if len(found) >= want or start <= since_ms:
            return found[-want:][::-1], searched_from, False
        span *= 4


# -- keys and timelines -------------------------------------------------------------------


def _field_name(name: str) -> str:
    return "host" if name == HOST_FIELD else name


def alert_key(rule: Rule, alert: dict[str, Any]) -> tuple[str, ...] | None:
    """The stored key an alert is about; None for summaries (no full key)."""
    if "kind" in alert:
        return None
    fields = _fields(alert)
    values = [fields.get(_field_name(f)) for f in rule.key_fields]
    if any(v is None for v in values):
        return None
    return tuple(v for v in values if v is not None)


def key_url(rule: Rule, key: tuple[str, ...]) -> str:
    params = [("rule", rule.id), *zip(rule.key_fields, key, strict=True)]
    return "/console/key?" + urlencode(params)


def _load(svc: Service, rule: Rule, key: tuple[str, ...]) -> KeyState | str | None:
    assert svc.firstseen is not None
    try:
        return svc.firstseen.get(rule.id, key)
    except RecordFormatError as exc:
        return f"unreadable record: {exc}"


def timeline_svg(
    state: KeyState,
    end_ms: int,
    days: int,
    mark: tuple[int, int] | None = None,
    height: int = 16,
    axis: bool = False,
) -> str:
    """The key's presence over the `days` before `end_ms` as an inline SVG: one bar per run
    (at least a few pixels wide, so a one-minute run shows), runs seen only by late points in
    another colour, `mark` (e.g. the alert's window) as a band behind them, a tooltip per run,
    and with `axis` dates (or hours) under it."""
    width = 720.0
    end_min = -(-end_ms // MINUTE_MS)
    start_min = end_min - days * 1440
    scale = width / (days * 1440)
    parts = [
        f'<svg class="timeline" viewBox="0 0 {width:g} {height}" preserveAspectRatio="none" '
        f'role="img" width="100%" height="{height}" '
        f'aria-label="presence over the last {days} days">',
        f'<rect class="bg" x="0" y="0" width="{width:g}" height="{height}"/>',
    ]
    unit = 60 if days <= 2 else 1440  # grid lines: hours or days
    tick = start_min + (-start_min % unit)
    while tick < end_min:
        x = (tick - start_min) * scale
        parts.append(f'<line class="grid" x1="{x:.2f}" x2="{x:.2f}" y1="0" y2="{height}"/>')
        tick += unit
    if mark is not None:
        m0 = max(mark[0] // MINUTE_MS, start_min)
        m1 = min(-(-mark[1] // MINUTE_MS), end_min)
        if m1 > m0:
            x0 = (m0 - start_min) * scale
            w = max((m1 - m0) * scale, 3.0)
            parts.append(
                f'<rect class="mark" x="{min(x0, width - w):.2f}" y="0" width="{w:.2f}" '
                f'height="{height}"><title>the alert\'s window</title></rect>'
            )
    late = set(state.untrusted.runs)
    shown = 0
    for run_start, run_end in state.history.runs:
        if run_end <= start_min or run_start >= end_min:
            continue
        shown += 1
        x0 = (max(run_start, start_min) - start_min) * scale
        x1 = (min(run_end, end_min) - start_min) * scale
        w = max(x1 - x0, 1.5)
        cls = "run late" if (run_start, run_end) in late else "run"
        title = f"{_minute(run_start)} to {_minute(run_end)} ({_duration(run_end - run_start)})"
        parts.append(
            f'<rect class="{cls}" x="{min(x0, width - w):.2f}" y="2" width="{w:.2f}" '
            f'height="{height - 4}"><title>{_e(title)}</title></rect>'
        )
    if not shown:
        parts.append(f"<title>not observed in the last {days} days</title>")
    parts.append("</svg>")
    if axis:  # HTML labels: SVG text would be stretched with the bar
        labels = []
        every = 7 * 1440 if days > 2 else 6 * 60
        t = start_min + (-start_min % every)
        while t < end_min:
            pct = (t - start_min) / (days * 1440) * 100
            text = _minute(t)[5:10] if days > 2 else _minute(t)[11:16]
            labels.append(f'<span style="left:{pct:.2f}%">{text}</span>')
            t += every
        parts.append(f'<div class="axis">{"".join(labels)}</div>')
    return "".join(parts)


# -- pages --------------------------------------------------------------------------------


def console_page(svc: Service, query: dict[str, list[str]]) -> bytes:
    rules = {r.id: r for r in svc.rules}
    f = Filters.parse(query, rules)
    now = svc.clock.now_ms()
    since = now - f.hours * 3_600_000
    alerts, searched_from, capped = recent_alerts(svc, since, f.limit, f.matches)
    out = [_form(svc, f)]
    note = f"{len(alerts)} alert(s), newest first, since {_e(_when(searched_from))}"
    if capped:
        note += (
            f" (the alert log holds more than {SCAN_CAP} alerts since {_e(_when(since))}: "
            "narrow the time range to see older ones)"
        )
    out.append(f'<p class="note" id="alert-count">{note}</p>')
    if alerts:
        out.append('<div class="alerts">')
        out.extend(_alert_card(svc, rules, a, now) for a in alerts)
        out.append("</div>")
    else:
        out.append('<p class="empty">No alert matches.</p>')
    out.append(_rules_section(svc))
    out.append(_sinks_section(svc))
    return _document("Alerts", "".join(out))


def _form(svc: Service, f: Filters) -> str:
    options = ['<option value="">any rule</option>']
    for r in svc.rules:
        sel = " selected" if r.id == f.rule else ""
        options.append(f'<option value="{_e(r.id)}"{sel}>{_e(r.id)}</option>')
    return (
        '<form method="get" action="/console" class="filters" id="filters">'
        f'<label>rule <select name="rule" id="f-rule">{"".join(options)}</select></label>'
        f'<label>host <input name="host" id="f-host" value="{_e(f.host)}" '
        'placeholder="substring or glob"></label>'
        f'<label>path <input name="path" id="f-path" value="{_e(f.path)}" '
        'placeholder="substring or glob" size="30"></label>'
        f'<label>last <input name="hours" id="f-hours" value="{f.hours}" size="4"> hours</label>'
        f'<label>at most <input name="limit" id="f-limit" value="{f.limit}" size="4"></label>'
        '<button type="submit" id="f-submit">Filter</button> <a href="/console">reset</a>'
        "</form>"
    )


def _alert_card(svc: Service, rules: dict[str, Rule], alert: dict[str, Any], now: int) -> str:
    rule_id = _rule_id(alert)
    fields = _fields(alert)
    kind = alert.get("kind")
    badges = []
    if kind:
        badges.append(f'<span class="badge summary">{_e(kind)}</span>')
    if alert.get("late"):
        badges.append('<span class="badge">late</span>')
    if alert.get("mode") == "stream":
        badges.append('<span class="badge">stream</span>')
    path = fields.get("process.executable.path")
    head = [
        f'<span class="time">{_e(_when_text(alert.get("time")))}</span>',
        f'<span class="rule">{_e(rule_id)}</span>',
        f'<span class="score">risk {_e(alert.get("risk_score", ""))}</span>',
        *badges,
    ]
    rows = []
    if path is not None:
        cls = "path sus" if suspicion(path) < 3 else "path"
        rows.append(f'<div class="{cls}">{_e(path)}</div>')
    rows.append(f'<div class="msg">{_e(alert.get("risk_message", ""))}</div>')
    context = alert.get("context")
    if isinstance(context, dict):
        rows.append(_context(context))
    if fields:
        cells = "".join(
            f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>"
            for k, v in fields.items()
            if k != "process.executable.path"
        )
        rows.append(f'<table class="kv">{cells}</table>')
    seen = [
        f"{label} {_e(_when_text(alert.get(name)))}"
        for label, name in (("first seen", "first_seen"), ("last seen", "last_seen"))
        if alert.get(name)
    ]
    if seen:
        rows.append(f'<div class="seen">{" · ".join(seen)}</div>')
    listed = _listed(alert)
    if listed:
        items = "".join(
            f'<li><span class="path">{_e(p)}</span> on {_e(h)}</li>' for h, p in listed[:20]
        )
        more = f"<li>… and {len(listed) - 20} more</li>" if len(listed) > 20 else ""
        rows.append(f'<ul class="listed">{items}{more}</ul>')
    rule = rules.get(rule_id)
    key = alert_key(rule, alert) if rule is not None else None
    if rule is not None and key is not None:
        state = _load(svc, rule, key)
        window = alert.get("window")
        mark = None
        if isinstance(window, dict):
            try:
                from pathwatch.alerts.event import parse_rfc3339

                mark = (parse_rfc3339(str(window["start"])), parse_rfc3339(str(window["end"])))
            except (KeyError, ValueError):
                mark = None
        if isinstance(state, KeyState):
            rows.append(
                '<div class="mini"><span class="lbl">30 days</span>'
                f"{timeline_svg(state, now, TIMELINE_DAYS, mark)}</div>"
            )
        elif isinstance(state, str):
            rows.append(f'<div class="err">{_e(state)}</div>')
        else:
            rows.append('<div class="note">key no longer stored (expired)</div>')
        rows.append(f'<a class="keylink" href="{_e(key_url(rule, key))}">key history</a>')
    return (
        f'<article class="alert" data-alert-id="{_e(alert.get("id", ""))}">'
        f"<header>{' '.join(head)}</header>{''.join(rows)}</article>"
    )


def _context(context: dict[str, Any]) -> str:
    parts = []
    summary = context.get("summary")
    if summary:
        parts.append(f'<div class="summary">{_e(summary)}</div>')
    facts = []
    for name, label in (
        ("path_seen_on_other_nodes", "path seen on other nodes"),
        ("name_seen_on_other_nodes", "name seen on other nodes"),
        ("host_first_seen", "host first seen"),
    ):
        if name in context:
            facts.append(f"{label}: <b>{_e(context[name])}</b>")
    usual = context.get("name_usual_paths")
    if isinstance(usual, list) and usual:
        shown = ", ".join(
            f"{_e(u.get('path', ''))} ({_e(u.get('nodes', ''))} nodes)"
            for u in usual[:5]
            if isinstance(u, dict)
        )
        facts.append(f"usual paths: {shown}")
    if facts:
        parts.append(f'<div class="facts">{" · ".join(facts)}</div>')
    return f'<div class="context">{"".join(parts)}</div>'


def _rules_section(svc: Service) -> str:
    assert svc.alerts is not None
    rows = []
    for rule in svc.rules:
        status: dict[str, object] = svc.baseline_status(rule) if rule.enabled else {}
        without = (
            svc.runner.clusters_without_baseline.get(rule.id, []) if svc.runner is not None else []
        )
        last = svc.alerts.last_tick(rule.id) if rule.enabled else None
        error = svc.scheduler.rule_errors.get(rule.id) if svc.scheduler is not None else None
        if not rule.enabled:
            baseline = "—"
        elif status.get("complete"):
            baseline = '<span class="ok">complete</span>'
        else:
            full_at = _when_text(status.get("baseline_full_at"))
            warm = _when_text(status.get("warmup_until"))
            baseline = (
                f'<span class="warn">building</span> until {_e(full_at)}, warm-up until {_e(warm)}'
            )
        if without:
            baseline += f'<div class="warn">no baseline yet: {_e(", ".join(without))}</div>'
        tick = (
            "never"
            if last is None
            else f"{_e(_when(last.tick_ms))}: {len(last.alert_ids)} alert(s)"
        )
        rows.append(
            f"<tr><td><a href='/console?{_e(urlencode({'rule': rule.id}))}'>{_e(rule.id)}</a>"
            f"<div class='sub'>{_e(rule.name)}</div></td>"
            f"<td>{'on' if rule.enabled else 'off'}</td><td>{_e(rule.mode)}</td>"
            f"<td><code>{_e(rule.schedule)}</code></td><td>{baseline}</td><td>{tick}</td>"
            f"<td class='err'>{_e(error) if error else ''}</td></tr>"
        )
    return (
        '<h2 id="rules">Rules</h2><table class="grid" id="rules-table"><tr><th>rule</th>'
        "<th>enabled</th><th>mode</th><th>schedule</th><th>baseline</th><th>last tick</th>"
        f"<th>last error</th></tr>{''.join(rows)}</table>"
    )


def _sinks_section(svc: Service) -> str:
    assert svc.alerts is not None
    rows = []
    for status in svc.dispatcher.statuses() if svc.dispatcher is not None else []:
        dead = sum(1 for _ in svc.alerts.deadletters(status.name, [status.name]))
        rows.append(
            f"<tr><td>{_e(status.name)}</td><td>{_e(status.type)}</td>"
            f"<td>{'<span class=warn>disabled</span>' if status.disabled else 'on'}</td>"
            f"<td class='num'>{status.depth}</td>"
            f"<td class='num'>{_e(_duration_s(status.oldest_age_s))}</td>"
            f"<td class='num{' warn' if dead else ''}'>{dead}</td></tr>"
        )
    if not rows:
        rows.append("<tr><td colspan='6' class='empty'>no sinks configured</td></tr>")
    return (
        '<h2 id="sinks">Sinks</h2><table class="grid" id="sinks-table"><tr><th>sink</th>'
        "<th>type</th><th>state</th><th>outbox depth</th><th>oldest pending</th>"
        f"<th>dead letters</th></tr>{''.join(rows)}</table>"
    )


def key_page(svc: Service, query: dict[str, list[str]]) -> bytes:
    rules = {r.id: r for r in svc.rules}
    rule_id = _text(query, "rule")
    rule = rules.get(rule_id)
    if rule is None:
        raise ConsoleError(f"unknown rule {rule_id!r} (rules: {', '.join(rules)})")
    missing = [f for f in rule.key_fields if not query.get(f)]
    if missing:
        raise ConsoleError(f"the key of rule {rule.id} needs {', '.join(missing)}")
    key = tuple(query[f][0] for f in rule.key_fields)
    now = svc.clock.now_ms()
    cells = "".join(
        f"<tr><th>{_e(f)}</th><td>{_e(v)}</td></tr>"
        for f, v in zip(rule.key_fields, key, strict=True)
    )
    out = [f'<p>{_home()}</p><h2>Key of {_e(rule.id)}</h2><table class="kv">{cells}</table>']
    state = _load(svc, rule, key)
    if isinstance(state, str):
        out.append(f'<p class="err">{_e(state)}</p>')
    elif state is None:
        out.append('<p class="empty">This key is not stored (never observed, or expired).</p>')
    else:
        out.append(
            f'<p class="seen">first seen {_e(_when(state.first_seen_ms))} · last seen '
            f"{_e(_when(state.last_seen_ms))} · {len(state.history.runs)} run(s)</p>"
            f'<h3>Last {TIMELINE_DAYS} days</h3><div class="big" id="timeline-30d">'
            f"{timeline_svg(state, now, TIMELINE_DAYS, height=24, axis=True)}</div>"
            '<h3>Last 24 hours</h3><div class="big" id="timeline-24h">'
            f"{timeline_svg(state, now, 1, height=24, axis=True)}</div>"
            '<p class="legend"><span class="sw run"></span> observed '
            '<span class="sw late"></span> observed only by late points (never baseline)</p>'
        )
        late = set(state.untrusted.runs)
        runs = "".join(
            f"<tr><td>{_e(_minute(s))}</td><td>{_e(_minute(e))}</td>"
            f"<td class='num'>{_e(_duration(e - s))}</td>"
            f"<td>{'late only' if (s, e) in late else ''}</td></tr>"
            for s, e in reversed(state.history.runs)
        )
        out.append(
            '<h3>Runs (newest first)</h3><table class="grid" id="runs">'
            f"<tr><th>from</th><th>until</th><th>length</th><th></th></tr>{runs}</table>"
        )
    fields = {_field_name(f): v for f, v in zip(rule.key_fields, key, strict=True)}

    def same_key(alert: dict[str, Any]) -> bool:
        return _rule_id(alert) == rule.id and all(
            _fields(alert).get(n) == v for n, v in fields.items()
        )

    alerts, _, _ = recent_alerts(svc, now - MAX_HOURS * 3_600_000, 20, same_key)
    out.append("<h3>Alerts for this key</h3>")
    if alerts:
        items = "".join(
            f"<li>{_e(_when_text(a.get('time')))} · <code>{_e(a.get('id', ''))}</code></li>"
            for a in alerts
        )
        out.append(f"<ul>{items}</ul>")
    else:
        out.append('<p class="empty">none in the alert log</p>')
    return _document("Key history", "".join(out))


# -- formatting ---------------------------------------------------------------------------


def _e(value: object) -> str:
    """Display-safe (control and bidi characters made visible), then HTML-escaped."""
    return html.escape(display_safe(str(value)), quote=True)


def _home() -> str:
    return '<a href="/console">back to the alerts</a>'


def _when(ms: int) -> str:
    return rfc3339(ms - ms % 1000).replace("T", " ").replace("Z", " UTC")


def _when_text(value: object) -> str:
    return str(value).replace("T", " ").replace("Z", " UTC") if value else ""


def _minute(minute: int) -> str:
    return _when(minute * MINUTE_MS)


def _duration(minutes: int) -> str:
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 2880:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes // 1440} d {minutes % 1440 // 60} h"


def _duration_s(seconds: float) -> str:
    return "—" if seconds <= 0 else _duration(int(seconds // 60)) if seconds >= 60 else "< 1 min"


_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232a;
background:#f4f5f7}
header.top{background:#1d232a;color:#fff;padding:10px 20px}
header.top h1{font-size:17px;margin:0;display:inline}
header.top a{color:#9cc3ff;margin-left:16px}
main{padding:14px 20px;max-width:1200px}
code,.path,.kv td{font-family:ui-monospace,Menlo,Consolas,monospace}
.filters{display:flex;flex-wrap:wrap;gap:10px;align-items:center;background:#fff;padding:10px;
border:1px solid #d6d9de;border-radius:6px}
.filters input,.filters select{font:inherit;padding:2px 4px}
.note,.sub,.seen{color:#5b6470;font-size:12px}
.alert{background:#fff;border:1px solid #d6d9de;border-radius:6px;margin:10px 0;padding:8px 12px}
.alert header{display:flex;gap:10px;align-items:baseline;flex-wrap:wrap}
.time{font-weight:600}.rule{color:#5b6470}.score{color:#8a3b00}
.badge{background:#e6e9ee;border-radius:3px;padding:0 5px;font-size:12px}
.badge.summary{background:#fde7c4}
.path{font-size:15px;word-break:break-all;white-space:pre-wrap}
.path.sus{color:#b00020;font-weight:600}
.msg{margin:2px 0}
.context{background:#f7f8fa;border-left:3px solid #9cc3ff;padding:3px 8px;margin:4px 0}
.kv{border-collapse:collapse;font-size:12px;margin:4px 0}
.kv th{text-align:left;font-weight:normal;color:#5b6470;padding:0 10px 0 0}
.kv td{word-break:break-all;white-space:pre-wrap}
table.grid{border-collapse:collapse;background:#fff;width:100%}
table.grid th,table.grid td{border:1px solid #d6d9de;padding:4px 8px;text-align:left;
vertical-align:top}
.num{text-align:right}
.ok{color:#176b2c}.warn{color:#8a5a00}.err{color:#b00020}.empty{color:#5b6470}
.mini{display:flex;gap:8px;align-items:center;margin:4px 0}
.mini .lbl{font-size:11px;color:#5b6470;white-space:nowrap}
.timeline{display:block}
.timeline .bg{fill:#eef0f3}.timeline .grid{stroke:#dde1e6;stroke-width:.5}
.timeline .run{fill:#2f6fdb}.timeline .run.late{fill:#e08a00}
.timeline .mark{fill:#f6c8cf}
.axis{position:relative;height:14px;font-size:10px;color:#5b6470}
.axis span{position:absolute;transform:translateX(-50%)}
.big{background:#fff;border:1px solid #d6d9de;padding:6px;border-radius:6px}
.legend .sw{display:inline-block;width:12px;height:10px;margin-left:10px}
.legend .sw.run{background:#2f6fdb}.legend .sw.late{background:#e08a00}
ul.listed{margin:4px 0;padding-left:18px;font-size:13px}
.keylink{font-size:12px}
"""


def _document(title: str, body: str) -> bytes:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        "<meta name='referrer' content='no-referrer'>"
        f"<title>pathwatch · {_e(title)}</title><style>{_STYLE}</style></head><body>"
        "<header class='top'><h1>pathwatch alert console</h1>"
        "<a href='/console'>alerts</a><a href='/console#rules'>rules</a>"
        "<a href='/console#sinks'>sinks</a></header>"
        f"<main>{body}</main></body></html>"
    ).encode()
