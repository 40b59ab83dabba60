"""The alert console (GET /console): access over plain HTTP, and the page in a real headless
Chromium (Debian's `chromium` and `chromium-driver`, which .ci/run installs) driven by
Selenium with the system chromedriver: an alert just produced is listed, the filter form
filters on the server, a hostile path is text (no script runs, none is in the DOM), a key's
timeline renders, and screenshots are kept as artifacts."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.support import (
    RULE,
    HttpSink,
    Proc,
    ServiceProcess,
    export,
    iso,
    minute_floor,
    now_ms,
    process_request,
    wait_until,
)

pytestmark = pytest.mark.integration

TOKEN = "console-test-token/with+odd=chars"
HOSTILE = "/tmp/<script>alert(1)</script>"
TRICKY = "/tmp/\u202egpj.exe\x1b[31m"  # a bidi override and an ANSI escape


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _find("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = _find("chromedriver")
NO_BROWSER = (
    "chromium and chromedriver not found (.ci/run installs Debian's chromium and chromium-driver)"
)


def _request(
    svc: ServiceProcess,
    method: str,
    path: str,
    token: str | None = TOKEN,
    cookie: str | None = None,
) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(f"http://127.0.0.1:{svc.http_port}{path}", method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if cookie:
        req.add_header("Cookie", cookie)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=15) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def _api(svc: ServiceProcess, method: str, path: str) -> Any:
    status, _, body = _request(svc, method, path)
    assert status == 200, body
    return json.loads(body)


def _start(
    tmp_path: Path, factory: type[ServiceProcess], sinks: list[dict[str, Any]]
) -> ServiceProcess:
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    return factory(
        tmp_path / "data",
        {
            "http": {"listen": "127.0.0.1:0", "auth": {"bearer_token_file": str(token_file)}},
            "sinks": sinks,
        },
    ).start()


def _produce_alerts(svc: ServiceProcess) -> int:
    """A baseline three hours ago, then new processes in the last hour; evaluates the tick at
    the current minute (rules have no delay under ServiceProcess) and returns it."""
    now = now_ms()
    known = Proc(100, "/usr/bin/python3")
    export(svc.grpc_port, process_request([known], now - 3 * 3_600_000))
    export(svc.grpc_port, process_request([Proc(200, "/tmp/.cache/kworkerd")], now - 40 * 60_000))
    export(
        svc.grpc_port,
        process_request(
            [
                known,
                Proc(200, "/tmp/.cache/kworkerd"),
                Proc(300, HOSTILE, host="node-2"),
                Proc(400, TRICKY, host="node-3"),
            ],
            now - 2 * 60_000,
        ),
    )
    tick = minute_floor(now)
    body = _api(svc, "POST", f"/api/v1/rules/{RULE}/evaluate?at={iso(tick)}")
    paths = sorted(a["fields"]["process.executable.path"] for a in body["alerts"])
    assert paths == sorted(["/tmp/.cache/kworkerd", HOSTILE, TRICKY]), paths
    return tick


def test_console_access(tmp_path: Path, service_factory: type[ServiceProcess]) -> None:
    """With an admin token the console needs it: as the bearer header, or once as ?token=,
    which redirects to the page without it and sets an HttpOnly, SameSite=Strict cookie for
    /console only. The cookie does not open /api/, and the token never reaches the log."""
    svc = _start(tmp_path, service_factory, [])
    status, headers, body = _request(svc, "GET", "/console", token=None)
    assert status == 401 and "token" in body and headers["WWW-Authenticate"].startswith("Bearer")
    assert _request(svc, "GET", "/console", token="wrong")[0] == 401
    assert _request(svc, "GET", "/console?token=wrong", token=None)[0] == 401
    status, headers, body = _request(svc, "GET", "/console")
    assert status == 200 and "<form" in body
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none'
    assert "default-src 'none'" in headers["Content-Security-Policy"]

    status, headers, _ = _request(
        svc, "GET", f"/console?host=node-1&token={quote(TOKEN, safe='')}", token=None
    )
    assert status == 303 and headers["Location"] == "/console?host=node-1"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    pair = cookie.split(";")[0]
    status, _, body = _request(svc, "GET", "/console?host=node-1", token=None, cookie=pair)
    assert status == 200 and 'value="node-1"' in body
    assert _request(svc, "GET", "/console/key?rule=" + RULE, token=None, cookie=pair)[0] == 400
    assert _request(svc, "GET", "/api/v1/rules", token=None, cookie=pair)[0] == 401
    bad = "pathwatch_console=" + quote("not-it", safe="")
    assert _request(svc, "GET", "/console", token=None, cookie=bad)[0] == 401
    assert _request(svc, "GET", "/console?rule=nope")[0] == 400
    assert _request(svc, "GET", "/console?limit=0")[0] == 400
    svc.stop()
    assert not any(TOKEN in line or quote(TOKEN, safe="") in line for line in svc.lines)


def test_console_sign_in_works_with_protected_probes(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """With http.protect_probes the probes need the header, and the console still signs in
    with ?token= and its cookie (it checks the token itself)."""
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    http = {"listen": "127.0.0.1:0", "protect_probes": True,
            "auth": {"bearer_token_file": str(token_file)}}  # fmt: skip
    svc = service_factory(tmp_path / "data", {"http": http}).start()
    assert _request(svc, "GET", "/metrics", token=None)[0] == 401
    status, headers, _ = _request(svc, "GET", f"/console?token={quote(TOKEN, safe='')}", None)
    assert status == 303
    pair = headers["Set-Cookie"].split(";")[0]
    assert _request(svc, "GET", "/console", token=None, cookie=pair)[0] == 200
    svc.stop()


def test_console_without_token_is_open(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """Without an admin token (the loopback default) the console is as open as /api/."""
    svc = service_factory(tmp_path / "data").start()
    status, _, body = _request(svc, "GET", "/console", token=None)
    assert status == 200 and "Rules" in body and "Sinks" in body


def test_rendering_escapes_every_value_and_draws_runs() -> None:
    """Every attacker-controlled value of an alert (fields, context, summary listings) is
    escaped and made display-safe; the timeline clips runs to its span and keeps one-minute
    runs visible."""
    from pathwatch.app.console import Filters, _alert_card, matcher, timeline_svg
    from pathwatch.store.codec import KeyState
    from pathwatch.store.presence import PresenceHistory

    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>\x1b\u202e'
    alert = {
        "id": evil,
        "kind": evil,
        "time": evil,
        "rule": {"id": evil},
        "risk_score": evil,
        "risk_message": evil,
        "fields": {evil: evil, "host": evil, "process.executable.path": evil},
        "context": {"summary": evil, "name_usual_paths": [{"path": evil, "nodes": evil}]},
        "keys": [{"host": evil, "path": evil}],
        "first_seen": evil,
    }
    card = _alert_card(None, {}, alert, now_ms())  # type: ignore[arg-type]
    assert "<script" not in card and "<img" not in card and "\x1b" not in card
    assert "\u202e" not in card and "&lt;script&gt;" in card and "\\u202e" in card
    f = Filters.parse({"host": ["node-*"], "path": ["/tmp/"]}, [RULE])
    assert f.matches({"rule": {"id": RULE}, "keys": [{"host": "node-2", "path": "/tmp/x"}]})
    assert not f.matches({"fields": {"host": "node-2", "process.executable.path": "/usr/x"}})
    assert matcher("/tmp/")("/var/tmp/x") and not matcher("/tmp/*")("/var/tmp/x")

    end = 100 * 1440 * 60_000
    end_min = end // 60_000
    state = KeyState(
        0,
        end,
        PresenceHistory(
            ((10, 20), (end_min - 31 * 1440, end_min - 29 * 1440), (end_min - 5, end_min - 4))
        ),
        PresenceHistory(((end_min - 5, end_min - 4),)),
    )
    svg = timeline_svg(state, end, 30)
    assert svg.count('class="run"') == 1 and svg.count('class="run late"') == 1
    assert 'x="0.00"' in svg  # the run that began before the span starts at its edge


# -- in a real browser ----------------------------------------------------------------------


def _keep(shot: Path) -> None:
    print(f"console screenshot: {shot}")
    target = os.environ.get("PATHWATCH_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)
        print(f"console screenshot copied to: {Path(target) / shot.name}")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(NO_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--window-size=1280,1700",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    # The system driver, named explicitly: Selenium must not look for (or fetch) one itself.
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(10)
        yield driver
    finally:
        driver.quit()


@pytest.mark.timeout(240)
def test_console_in_a_browser(
    tmp_path: Path, service_factory: type[ServiceProcess], sink: HttpSink, browser: Any
) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    broken = HttpSink(default=400)  # every delivery fails for good: dead letters
    try:
        svc = _start(
            tmp_path,
            service_factory,
            [
                {"name": "soc", "type": "webhook", "url": sink.url},
                {"name": "broken", "type": "webhook", "url": broken.url},
            ],
        )
        _produce_alerts(svc)
        wait_until(
            lambda: any(
                s["name"] == "broken" and s["deadletters"] == 3
                for s in _api(svc, "GET", "/api/v1/sinks")["sinks"]
            ),
            timeout=20,
            interval=0.1,
        )
    finally:
        broken.close()
    base = f"http://127.0.0.1:{svc.http_port}"
    wait = WebDriverWait(browser, 15)

    def cards() -> list[Any]:
        return list(browser.find_elements(By.CSS_SELECTOR, "article.alert"))

    def card_paths() -> list[str]:
        return sorted(
            c.find_element(By.CSS_SELECTOR, ".path").text
            for c in cards()
            if c.find_elements(By.CSS_SELECTOR, ".path")
        )

    # Without the token: the sign-in page, no alerts.
    browser.get(base + "/console")
    assert "needs the admin API's bearer token" in browser.find_element(By.TAG_NAME, "main").text
    assert cards() == []

    # Once with ?token=: redirected to the page without it; the cookie carries it from then on.
    browser.get(f"{base}/console?token={quote(TOKEN, safe='')}")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "article.alert"))
    assert "token" not in browser.current_url
    cookie = browser.get_cookie("pathwatch_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    shown_tricky = "/tmp/\\u202egpj.exe\\x1b[31m"
    assert card_paths() == sorted(["/tmp/.cache/kworkerd", HOSTILE, shown_tricky])

    # The hostile path is text: no script element anywhere (the page has no script at all),
    # no dialog; control and bidi characters are shown as escapes.
    assert HOSTILE in card_paths()
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.execute_script("return document.scripts.length") == 0
    with pytest.raises(NoAlertPresentException):
        _ = browser.switch_to.alert.text

    # Context and key fields are on the card of the new process.
    (kworkerd,) = [c for c in cards() if "kworkerd" in c.text]
    assert "node-1" in kworkerd.text and "200" in kworkerd.text
    assert kworkerd.find_elements(By.CSS_SELECTOR, "svg.timeline rect.run")

    # Rules with baseline status; sinks with outbox depth and dead letters.
    rules = browser.find_element(By.ID, "rules-table").text
    assert RULE in rules and "building" in rules
    sinks = {
        row.find_elements(By.TAG_NAME, "td")[0].text: [
            td.text for td in row.find_elements(By.TAG_NAME, "td")
        ]
        for row in browser.find_elements(By.CSS_SELECTOR, "#sinks-table tr")
        if row.find_elements(By.TAG_NAME, "td")
    }
    # columns: sink, type, state, outbox depth, oldest pending, dead letters
    assert (sinks["broken"][3], sinks["broken"][5]) == ("0", "3"), sinks
    assert (sinks["soc"][3], sinks["soc"][5]) == ("0", "0"), sinks

    shot = tmp_path / "console.png"
    assert browser.save_screenshot(str(shot))
    _keep(shot)

    def submit(**values: str) -> None:
        for name, value in values.items():
            if name == "rule":
                Select(browser.find_element(By.ID, "f-rule")).select_by_value(value)
            else:
                box = browser.find_element(By.ID, f"f-{name}")
                box.clear()
                box.send_keys(value)
        old = browser.find_element(By.ID, "filters")
        browser.find_element(By.ID, "f-submit").click()
        wait.until(lambda d: old not in d.find_elements(By.ID, "filters"))

    # Filters (a plain form, filtered by the server): by path, then another host hides it.
    submit(path="kworkerd")
    assert "path=kworkerd" in browser.current_url
    assert card_paths() == ["/tmp/.cache/kworkerd"]
    submit(host="node-9")
    assert cards() == [] and "No alert matches" in browser.page_source
    submit(host="node-2", path="/tmp/*")
    assert card_paths() == [HOSTILE]
    submit(host="", path="")
    assert len(cards()) == 3
    submit(rule="kubernetes_process_new_path_per_node")
    assert cards() == []
    submit(rule=RULE, path="*kworker*")
    assert card_paths() == ["/tmp/.cache/kworkerd"]

    # The key's presence history: two runs (40 and 2 minutes ago) on the timelines.
    browser.find_element(By.CSS_SELECTOR, "article.alert a.keylink").click()
    wait.until(lambda d: d.find_elements(By.ID, "timeline-30d"))
    assert "/console/key" in browser.current_url
    for box in ("timeline-30d", "timeline-24h"):
        runs = browser.find_elements(By.CSS_SELECTOR, f"#{box} svg rect.run")
        assert len(runs) == 2, box
        assert all(r.size["width"] > 0 for r in runs)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#runs tr")) == 1 + 2
    assert "/tmp/.cache/kworkerd" in browser.find_element(By.CSS_SELECTOR, "table.kv").text
    shot = tmp_path / "console-key.png"
    assert browser.save_screenshot(str(shot))
    _keep(shot)
    svc.stop()
    assert not any(TOKEN in line or quote(TOKEN, safe="") in line for line in svc.lines)
