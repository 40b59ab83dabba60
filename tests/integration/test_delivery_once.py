"""Delivery within one process: each alert sent once, the outbox depth counted not scanned,
connections reused, and a worker that survives what one batch throws at it."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pathwatch.alerts.dispatcher import Dispatcher, SinkWorker
from pathwatch.alerts.http import HttpRequest
from pathwatch.clock import SystemClock
from pathwatch.config.model import Duration, RetryConfig, SinkConfig
from pathwatch.store import Database
from pathwatch.store import keyspace as ks
from pathwatch.store.alertlog import AlertStore, Delivery
from pathwatch.telemetry.metrics import Metrics
from tests.support import HttpSink, wait_until

pytestmark = pytest.mark.integration

FAST_RETRY = RetryConfig(initial_backoff=Duration(0.05), max_backoff=Duration(0.2))


def event(i: int) -> dict[str, Any]:
    return {"id": f"alert-{i:05d}", "time": "2026-01-01T00:00:00Z", "risk_object": "node-1"}


def enqueue(alerts: AlertStore, sinks: Sequence[str], ids: range) -> list[str]:
    """Commit one alert per id with one delivery per sink, in one write (as a tick does)."""
    events = [(f"alert-{i:05d}", 1_700_000_000_000 + i, event(i)) for i in ids]
    deliveries = [(s, a, e) for a, _, e in events for s in sinks]
    assert alerts.commit_tick(None, events, deliveries, now_ms=time.time_ns() // 1_000_000)
    return [a for a, _, _ in events]


def outbox_count(db: Database, sink: str) -> int:
    """The brute-force depth: every outbox key of the sink, counted."""
    return sum(1 for _ in db.scan_prefix(ks.outbox_prefix(sink), values=False))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database(str(tmp_path / "data"))
    yield d
    d.close()


def webhook(url: str, name: str = "soc", **extra: Any) -> SinkConfig:
    return SinkConfig(name=name, type="webhook", url=url, retry=FAST_RETRY, **extra)


# -- each alert once --------------------------------------------------------------------------


def test_thousands_of_alerts_with_many_workers_are_each_sent_once(
    db: Database, sink: HttpSink
) -> None:
    """3,000 alerts committed in one write, 8 workers, and commits of other ticks notifying
    the dispatcher meanwhile: every webhook-id reaches the receiver exactly once."""
    alerts = AlertStore(db)
    metrics = Metrics()
    dispatcher = Dispatcher([webhook(sink.url, max_concurrency=8)], alerts, SystemClock(), metrics)
    dispatcher.start()
    stop = threading.Event()

    def other_ticks() -> None:
        # Other rules' ticks commit and notify while this one is delivered (a redrive, which
        # re-reads the whole outbox, now and then).
        n = 0
        while not stop.wait(0.002):
            n += 1
            dispatcher.notify(full=n % 25 == 0)

    noise = threading.Thread(target=other_ticks, daemon=True)
    try:
        noise.start()
        ids = enqueue(alerts, ["soc"], range(3000))
        dispatcher.notify()
        wait_until(lambda: outbox_count(db, "soc") == 0, timeout=120, interval=0.1)
        stop.set()
        noise.join(5)
        # Barrier: once nothing is queued in memory either, no further request can be sent.
        wait_until(lambda: dispatcher.statuses()[0].depth == 0, timeout=20)
    finally:
        stop.set()
        dispatcher.shutdown(10)
    sent = Counter(r.headers["webhook-id"] for r in sink.received)
    assert set(sent) == set(ids)
    assert {i: n for i, n in sent.items() if n > 1} == {}


# -- the outbox depth: a counter ------------------------------------------------------------


class CountingDatabase(Database):
    """A real RocksDB that counts the scans reading the outbox keyspace."""

    outbox_scans = 0
    fail_next_commit = False

    def scan(self, lower: bytes, upper: bytes, **kwargs: Any) -> Iterator[tuple[bytes, bytes]]:
        if lower[:1] == b"O":
            self.outbox_scans += 1
        return super().scan(lower, upper, **kwargs)

    def commit(self, batch: Any) -> None:
        if self.fail_next_commit:
            self.fail_next_commit = False
            from pathwatch.store import StoreError

            raise StoreError("injected: WAL sync failed")
        super().commit(batch)


def depth_without_scanning(db: CountingDatabase, alerts: AlertStore, sink: str) -> int:
    """`alerts.depth(sink)`, asserting it read no outbox key to answer."""
    before = db.outbox_scans
    depth = alerts.depth(sink)
    assert db.outbox_scans == before, "depth() scanned the outbox"
    return depth


def test_outbox_depth_is_a_counter_kept_exact_by_every_outbox_write(tmp_path: Path) -> None:
    """After one count at first use, the depth of each sink's outbox is answered without
    reading the outbox, and equals the brute-force count after enqueue, overflow, retry
    updates, acks (twice for one record), dead letters, a redrive, a tick with other writes,
    and a write that failed."""
    db = CountingDatabase(str(tmp_path / "data"))
    try:
        alerts = AlertStore(db)
        assert alerts.depth("a") == 0  # the one count
        enqueue(alerts, ["a", "b"], range(100))
        overflow = [("a", "alert-x", event(0))]
        assert alerts.commit_tick(None, [], [], overflow, now_ms=1)

        def check() -> None:
            for s in ("a", "b"):
                assert depth_without_scanning(db, alerts, s) == outbox_count(db, s)

        check()
        assert depth_without_scanning(db, alerts, "a") == 100
        pending = alerts.pending("a", 0, limit=1000)
        for d in pending[:10]:
            alerts.ack(d)
        alerts.ack(pending[0])  # acknowledged twice: counted once
        for d in pending[10:15]:
            d.record["attempts"] = 1
            alerts.update(d)
        for d in pending[15:20]:
            alerts.dead_letter(d, "HTTP 400: no")
        alerts.dead_letter(pending[0], "acknowledged already")  # not in the outbox: left alone
        check()
        assert depth_without_scanning(db, alerts, "a") == 85
        assert alerts.redrive("a", ["a", "b"]) == 6  # 5 + the overflow
        check()
        assert depth_without_scanning(db, alerts, "a") == 91
        tick_extra = [(ks.meta_key("probe"), b"1")]
        assert alerts.commit_tick(None, [], [], now_ms=2, extra=tick_extra, deletes=[b"Zx"])
        check()
        db.fail_next_commit = True
        with pytest.raises(Exception, match="injected"):
            alerts.ack(pending[30])
        alerts.ack(pending[31])  # a write succeeds again: the counters are recounted once
        assert alerts.depth("a") == outbox_count(db, "a") == 90
        check()
    finally:
        db.close()


_KILLED_WRITER = """
import os, signal, sys
sys.path[:0] = {paths!r}
from pathwatch.store import Database
from pathwatch.store.alertlog import AlertStore
from tests.integration.test_delivery_once import enqueue

alerts = AlertStore(Database({path!r}))
enqueue(alerts, ["soc"], range(50))
pending = alerts.pending("soc", 0, limit=100)
for d in pending[:20]:
    alerts.ack(d)
for d in pending[20:25]:
    alerts.dead_letter(d, "HTTP 400")
print("written", alerts.depth("soc"), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_outbox_depth_is_exact_after_kill_9(tmp_path: Path) -> None:
    """A process that enqueued, acknowledged and dead-lettered is killed with SIGKILL; the
    reopened store counts the outbox once and then answers its exact depth from the counter."""
    path = str(tmp_path / "data")
    root = Path(__file__).resolve().parents[2]
    code = _KILLED_WRITER.format(paths=[str(root / "service"), str(root)], path=path)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["written", "25"]
    db = CountingDatabase(path)
    try:
        alerts = AlertStore(db)
        assert alerts.depth("soc") == 25 == outbox_count(db, "soc")
        for _ in range(100):
            assert depth_without_scanning(db, alerts, "soc") == 25
    finally:
        db.close()


# -- connections kept alive -------------------------------------------------------------------


class CountingServer:
    """An HTTP/1.1 keep-alive receiver that counts the TCP connections it accepts and the
    webhook-ids it answered. With `answers_per_connection`, a connection is closed, without
    a word, after that many answers (`drop_next` False) or when the next request arrives on
    it, which is left unanswered (`drop_next` True): a server that timed it out just then."""

    def __init__(self, answers_per_connection: int = 0, drop_next: bool = False) -> None:
        self.connections = 0
        self.answered: list[str] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            served = 0

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if drop_next and self.served == answers_per_connection:
                    self.close_connection = True
                    return
                self.served += 1
                with outer._lock:
                    outer.answered.append(self.headers.get("webhook-id", ""))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if not drop_next and self.served == answers_per_connection:
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                with outer._lock:
                    outer.connections += 1
                super().process_request(request, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def counting() -> Iterator[CountingServer]:
    s = CountingServer()
    yield s
    s.close()


def deliver_all(
    db: Database, config: SinkConfig, ids: range, metrics: Metrics | None = None
) -> Dispatcher:
    """Enqueue `ids` for the sink, start a dispatcher and wait until its outbox is empty.
    The caller shuts the dispatcher down."""
    alerts = AlertStore(db)
    dispatcher = Dispatcher([config], alerts, SystemClock(), metrics or Metrics())
    enqueue(alerts, [config.name], ids)
    dispatcher.start()
    try:
        wait_until(lambda: alerts.depth(config.name) == 0, timeout=60)
    except BaseException:
        dispatcher.shutdown(5)
        raise
    return dispatcher


def test_deliveries_reuse_kept_alive_connections(db: Database, counting: CountingServer) -> None:
    """300 webhook deliveries by 4 workers to an HTTP/1.1 server use at most 4 TCP
    connections, one per worker, instead of one per request."""
    deliver_all(db, webhook(counting.url, max_concurrency=4), range(300)).shutdown(5)
    assert len(set(counting.answered)) == 300
    assert 1 <= counting.connections <= 4


def test_connection_closed_by_the_server_is_replaced_without_a_failed_attempt(
    db: Database,
) -> None:
    """A server that closes each connection after two answers without saying so, or that
    drops a connection when a third request arrives on it, gets every alert once over half as
    many connections as alerts, and no attempt is counted as failed or retried."""
    for server in (
        CountingServer(answers_per_connection=2),
        CountingServer(answers_per_connection=2, drop_next=True),
    ):
        try:
            metrics = Metrics()
            config = webhook(server.url, max_concurrency=1)
            deliver_all(db, config, range(20), metrics).shutdown(5)
            assert sorted(server.answered) == [f"alert-{i:05d}" for i in range(20)]
            for outcome in ("retried", "failed"):
                counter = metrics.deliveries.labels(sink="soc", outcome=outcome)
                assert counter._value.get() == 0, outcome
            assert server.connections == 10
        finally:
            server.close()


def test_kept_alive_connection_times_out_like_a_new_one(db: Database) -> None:
    """A reused connection on which the answer does not come within the sink's timeout is
    counted as a retry and closed; the alert arrives on a new connection."""
    release = threading.Event()
    seen: list[tuple[str, int]] = []
    answered: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.headers["webhook-id"], self.client_address[1]))
            if len(seen) == 2:  # the second request, on the kept-alive connection: stall
                release.wait(10)
                self.close_connection = True
                return
            answered.append(self.headers["webhook-id"])
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    metrics = Metrics()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        config = webhook(url, max_concurrency=1, timeout=Duration(0.3))
        deliver_all(db, config, range(3), metrics).shutdown(5)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert sorted(set(answered)) == ["alert-00000", "alert-00001", "alert-00002"]
    assert metrics.deliveries.labels(sink="soc", outcome="retried")._value.get() == 1
    ports = [port for _, port in seen]
    assert ports[1] == ports[0], "the second request did not reuse the first connection"
    assert ports[2] != ports[1], "the timed-out connection was used again"


def test_proxy_from_the_environment_is_used_with_kept_alive_connections(
    db: Database, counting: CountingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With http_proxy set, plain-HTTP deliveries go through the proxy in absolute form (as
    urllib sent them), over a few kept-alive connections to the proxy."""
    monkeypatch.setenv("http_proxy", counting.url.rsplit("/", 1)[0])
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    deliver_all(db, webhook("http://sink.invalid/hook", max_concurrency=2), range(20)).shutdown(5)
    assert len(counting.answered) == 20
    assert 1 <= counting.connections <= 2


class TlsCountingServer:
    """An HTTPS HTTP/1.1 receiver that requires a client certificate signed by `ca` (unless
    `client_ca` is None) and counts connections and the client names it saw."""

    def __init__(self, ca: Any, client_ca: Any | None) -> None:
        import ssl

        self.connections = 0
        self.clients: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                peer = self.connection.getpeercert()  # type: ignore[attr-defined]
                subject = dict(x[0] for x in peer["subject"]) if peer else {}
                outer.clients.append(str(subject.get("commonName", "")))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                outer.connections += 1
                super().process_request(request, client_address)

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(ctx)
        if client_ca is not None:
            client_ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_tls_connections_are_kept_alive_with_mtls_and_without_verification(
    db: Database, tmp_path: Path
) -> None:
    """Over HTTPS with a private CA and a client certificate, and with insecure_skip_verify
    against a certificate nobody trusts, 20 deliveries by 2 workers use at most 2 TLS
    connections, and the mTLS receiver sees pathwatch's certificate on every request."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file, cert_file, key_file = (tmp_path / n for n in ("ca.pem", "client.pem", "client.key"))
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("pathwatch-client", common_name="pathwatch-client")
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    mtls = TlsCountingServer(ca, client_ca=ca)
    untrusted = TlsCountingServer(trustme.CA(), client_ca=None)
    try:
        tls = {"ca_file": str(ca_file), "cert_file": str(cert_file), "key_file": str(key_file)}
        deliver_all(db, webhook(mtls.url, max_concurrency=2, **tls), range(20)).shutdown(5)
        assert mtls.clients == ["pathwatch-client"] * 20
        assert 1 <= mtls.connections <= 2
        config = webhook(untrusted.url, name="lab", max_concurrency=2, insecure_skip_verify=True)
        deliver_all(db, config, range(20)).shutdown(5)
        assert len(untrusted.clients) == 20
        assert 1 <= untrusted.connections <= 2
    finally:
        mtls.close()
        untrusted.close()


# -- workers that survive ---------------------------------------------------------------------


class PickySink:
    """A batching sink (a JSON list of ids per request) whose formatting raises for one id."""

    def __init__(self, config: SinkConfig, bad_id: str) -> None:
        self.config = config
        self.batch_size = 10
        self.bad_id = bad_id

    def request(self, deliveries: Sequence[Delivery]) -> HttpRequest:
        ids = [d.alert_id for d in deliveries]
        if self.bad_id in ids:
            raise KeyError("fields")  # what a sink bug on an unexpected event looks like
        import json

        return HttpRequest(self.config.url, json.dumps(ids).encode())


def test_alert_the_sink_cannot_format_is_dead_lettered_alone(db: Database, sink: HttpSink) -> None:
    """In a batching sink, one alert whose formatting raises is dead-lettered with the reason
    and counted as a component failure of the sink; the other alerts of its batch, and of every
    batch, are delivered."""
    alerts = AlertStore(db)
    metrics = Metrics()
    config = webhook(sink.url, name="batch", max_concurrency=2)
    ids = enqueue(alerts, ["batch"], range(30))
    worker = SinkWorker(PickySink(config, ids[13]), alerts, SystemClock(), metrics)
    worker.start()
    try:
        wait_until(lambda: alerts.depth("batch") == 0, timeout=30)
    finally:
        worker.shutdown(5)
    delivered = [i for r in sink.received for i in r.json()]
    assert sorted(delivered) == sorted(set(ids) - {ids[13]})
    (dead,) = alerts.deadletters("batch", ["batch"])
    assert dead.alert_id == ids[13] and "cannot build request: KeyError" in dead.record["reason"]
    failures = metrics.component_failures.labels(component="sink:batch")._value.get()
    assert failures >= 1


class AckFailsOnce(AlertStore):
    """A real AlertStore whose ack raises an unexpected error once, for one alert."""

    def __init__(self, db: Database, alert_id: str) -> None:
        super().__init__(db)
        self.alert_id = alert_id
        self.raised = False

    def ack(self, delivery: Delivery) -> None:
        if delivery.alert_id == self.alert_id and not self.raised:
            self.raised = True
            raise RuntimeError("unexpected: index out of range")
        super().ack(delivery)


def test_worker_survives_an_unexpected_exception_and_counts_it(
    db: Database, sink: HttpSink
) -> None:
    """With a single worker, an unexpected exception while finishing one batch neither kills
    the worker nor loses the alert: it is logged with its stack and counted under
    component="sink:<name>", and every alert is delivered (that one again, after a backoff)."""
    from structlog.testing import capture_logs

    alerts = AckFailsOnce(db, "alert-00002")
    metrics = Metrics()
    enqueue(alerts, ["soc"], range(6))
    dispatcher = Dispatcher([webhook(sink.url, max_concurrency=1)], alerts, SystemClock(), metrics)
    with capture_logs() as logs:
        dispatcher.start()
        try:
            wait_until(lambda: alerts.depth("soc") == 0, timeout=30)
        finally:
            dispatcher.shutdown(5)
    sent = Counter(r.headers["webhook-id"] for r in sink.received)
    assert sent == {f"alert-{i:05d}": 1 for i in range(6)} | {"alert-00002": 2}
    assert metrics.component_failures.labels(component="soc")._value.get() == 0
    assert metrics.component_failures.labels(component="sink:soc")._value.get() == 1
    (failure,) = [e for e in logs if e.get("sink") == "soc" and e.get("exc_info")]
    assert failure["log_level"] == "error" and "alert-00002" in failure["alert_ids"]
