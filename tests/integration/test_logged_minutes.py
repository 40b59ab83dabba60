"""Logged minutes through the real service: scrapes at the collector's 60 s interval are
acknowledged from the extension log (store/extend.py), survive kill -9, and are folded."""

from __future__ import annotations

import re
from pathlib import Path

from pathwatch.store.db import Database, DatabaseOptions
from pathwatch.store.extend import LOG_PREFIX
from tests.support import Proc, ServiceProcess, export, iso, now_ms, process_request, wait_until

PROCS = [Proc(4000 + i, f"/srv/app/worker-{i}") for i in range(6)]


def sample(svc: ServiceProcess, name: str) -> float:
    status, text = svc.api("GET", "/metrics")
    assert status == 200
    m = re.search(rf"^{name} (\S+)$", str(text), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def scrape_minutes(svc: ServiceProcess, minutes: list[int]) -> None:
    for minute in minutes:
        export(svc.grpc_port, process_request(PROCS, minute * 60_000 + 7_000))


def keys(svc: ServiceProcess) -> dict[str, dict[str, object]]:
    _, body = svc.api("GET", "/api/v1/keys?path=/srv/app/*&limit=100")
    return {k["key"]["process.executable.path"]: k for k in body["keys"]}


def test_minutes_logged_at_the_60s_interval_survive_kill_9(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    data = tmp_path / "data"
    svc = service_factory(data).start()
    first = now_ms() // 60_000 - 20
    minutes = [first, first + 1, first + 2, first + 3]
    scrape_minutes(svc, minutes)
    # The first scrape writes six new keys, the second their next minute (now known to be
    # running processes); the next two only log their minute.
    assert sample(svc, "pathwatch_store_minutes_logged_total") == 12
    assert sample(svc, "pathwatch_store_keys_pending_fold") == 6
    before = keys(svc)
    assert before["/srv/app/worker-0"]["presence"] == [[iso(first * 60_000),
                                                        iso((first + 4) * 60_000)]]  # fmt: skip
    assert before["/srv/app/worker-0"]["last_seen"] == iso((first + 3) * 60_000 + 7_000)
    svc.kill()  # nothing was folded: the minutes live in the log only

    svc = service_factory(data).start()
    # Read back from the log before any write, then folded at once (they are old).
    wait_until(lambda: any("logged minutes recovered" in line and '"minutes": 12' in line
                           for line in svc.lines), timeout=10)  # fmt: skip
    wait_until(lambda: sample(svc, "pathwatch_store_keys_pending_fold") == 0, timeout=10)
    assert keys(svc) == before
    scrape_minutes(svc, [first + 4])  # after a restart the receiver knows no resource yet
    after = keys(svc)
    assert after["/srv/app/worker-5"]["presence"] == [[iso(first * 60_000),
                                                       iso((first + 5) * 60_000)]]  # fmt: skip
    svc.stop()


def test_logged_minutes_are_folded_into_records_and_the_log_emptied(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    data = tmp_path / "data"
    svc = service_factory(data, {"store": {"fold_interval": "1s"}}).start()
    first = now_ms() // 60_000 - 20
    scrape_minutes(svc, [first, first + 1, first + 2, first + 3])
    assert sample(svc, "pathwatch_store_minutes_logged_total") == 12
    wait_until(lambda: sample(svc, "pathwatch_store_keys_pending_fold") == 0, timeout=15)
    folded = keys(svc)
    assert folded["/srv/app/worker-3"]["presence"] == [[iso(first * 60_000),
                                                        iso((first + 4) * 60_000)]]  # fmt: skip
    assert svc.stop() == 0
    db = Database(str(data), DatabaseOptions(read_only=True))
    try:
        assert not list(db.scan_prefix(LOG_PREFIX))
    finally:
        db.close()
