"""The worker <-> service channel (receiver/remote.py) over a real socket pair, with a real
IngestWriter on a real RocksDB; and the summing of other processes' metrics."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pathwatch.clock import MINUTE_MS, SystemClock
from pathwatch.config.load import ConfigError, validate
from pathwatch.config.model import Config, GrpcReceiverConfig, ReceiverConfig
from pathwatch.observations import Extension, Mark, Sighting
from pathwatch.receiver._accounting import write_durably
from pathwatch.receiver.decode import DecodeResult
from pathwatch.receiver.remote import (
    Bridge,
    Channel,
    ChannelClosed,
    RemoteSink,
    extension_value,
)
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.store import Database, IngestWriter, Retention, WriterConfig
from pathwatch.store.durable import DurableResources
from pathwatch.store.extend import item_of
from pathwatch.store.firstseen import FirstSeenStore
from pathwatch.store.writer import Ticket, WriteFailed
from pathwatch.telemetry.metrics import Metrics, RetiredSamples, foreign_samples

RULE = PARITY_RULE.id
KEY = ("node-1", "prod", "node-1", "4242", "/tmp/x", "x")


def _pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return Channel(a), Channel(b)


def test_channel_carries_messages_and_reports_eof() -> None:
    ours, theirs = _pair()
    ours.send(("submit", 1, {"a": b"\xff"}, [], "", None))
    assert theirs.recv() == ("submit", 1, {"a": b"\xff"}, [], "", None)
    ours.close_sending()
    assert theirs.recv() is None
    theirs.close()
    ours.close()


def test_channel_refuses_an_oversized_or_truncated_frame() -> None:
    a, b = socket.socketpair()
    a.sendall(struct.pack(">I", (1 << 30) + 1))
    with pytest.raises(ChannelClosed, match="frame of"):
        Channel(b).recv()
    a.close()
    b.close()
    a, b = socket.socketpair()
    a.sendall(struct.pack(">I", 100) + b"short")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ChannelClosed, match="truncated"):
        Channel(b).recv()
    a.close()
    b.close()


def test_post_never_blocks_on_a_peer_that_stopped_reading_and_keeps_frames_in_order() -> None:
    """The service's writer answers workers with `post`: a worker that stops reading must not
    stall it. What the socket cannot take waits, in order and whole, until the peer reads."""
    ours, theirs = _pair()
    blob = b"x" * 100_000  # a few frames fill the socket pair's buffers
    count = 40
    posted = threading.Event()

    def post_all() -> None:
        for i in range(count):
            ours.post(("done", i, blob))
        ours.send(("stop", 1.0))  # a blocking send queues behind them, never in between
        posted.set()

    threading.Thread(target=post_all, daemon=True).start()
    assert posted.wait(10), "post blocked on a peer that is not reading"
    received = [theirs.recv() for _ in range(count + 1)]
    assert received == [("done", i, blob) for i in range(count)] + [("stop", 1.0)]
    ours.close()
    theirs.close()


def test_post_to_a_closed_peer_is_channel_closed() -> None:
    ours, theirs = _pair()
    theirs.close()
    with pytest.raises(ChannelClosed):
        for _ in range(100):  # the first frames may still fit the dead socket's buffer
            ours.post(("done", 1, b"y" * 100_000))
    ours.close()


def test_ticket_callbacks_run_once_on_finish_or_at_once_when_finished() -> None:
    ticket = Ticket(1)
    calls: list[str] = []
    ticket.add_done_callback(lambda: calls.append("early"))
    assert calls == []
    ticket.finish(None)
    assert calls == ["early"]
    ticket.add_done_callback(lambda: calls.append("late"))
    assert calls == ["early", "late"]
    assert ticket.wait(0)


class _StuckSink:
    """A sink whose writes never finish (a disk that hangs)."""

    def __init__(self) -> None:
        self.tickets: list[Ticket] = []

    def submit(
        self,
        batch: object,
        marks: object = (),
        sender: str = "",
        extension: object = None,
    ) -> Ticket:
        ticket = Ticket(1)
        self.tickets.append(ticket)
        return ticket


def test_a_write_that_never_finishes_is_answered_failed_in_time_and_its_late_end_dropped() -> None:
    """The worker's pending batch is answered as failed once the wait is over (its Export
    was answered UNAVAILABLE meanwhile), so nothing stays waiting on either side; when the
    write finishes after all, no second answer is sent."""
    ours, theirs = _pair()
    sink = _StuckSink()
    bridge = Bridge(ours, sink, None, 0.0, lambda samples: None, "grpc-worker-1")
    serving = threading.Thread(target=bridge.serve, daemon=True)
    serving.start()
    theirs.send(("submit", 5, {}, [], "", None))
    theirs.settimeout(15)
    answer = theirs.recv()
    assert answer[:4] == ("done", 5, "durable write did not finish in time", False)
    sink.tickets[0].finish(None)  # too late: dropped
    theirs.send(("submit", 6, {}, [], "", None))
    sink_ticket = _wait_for_ticket(sink, 2)
    sink_ticket.finish(None)
    assert theirs.recv() == ("done", 6, None, False, [], [])
    theirs.close_sending()
    serving.join(10)
    assert not serving.is_alive()
    ours.close()
    theirs.close()


def _wait_for_ticket(sink: _StuckSink, n: int) -> Ticket:
    deadline = time.monotonic() + 10
    while len(sink.tickets) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return sink.tickets[n - 1]


class _Worker:
    """A worker's half: its RemoteSink and the thread that reads the service's answers."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.durable = DurableResources(1000)
        self.sink = RemoteSink(channel, self.durable)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except ChannelClosed:
                message = None
            if message is None:
                self.sink.close("the service process is gone")
                return
            assert message[0] == "done"
            self.sink.complete(*message[1:])


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[tuple[_Worker, IngestWriter, DurableResources]]:
    yield from _bridged(tmp_path, 1000)


@pytest.fixture
def bridged_forgetful(tmp_path: Path) -> Iterator[tuple[_Worker, IngestWriter, DurableResources]]:
    """The service process keeps no DurableResources entry at all."""
    yield from _bridged(tmp_path, 0)


def _bridged(
    tmp_path: Path, capacity: int
) -> Iterator[tuple[_Worker, IngestWriter, DurableResources]]:
    db = Database(str(tmp_path / "db"))
    store = FirstSeenStore(db)
    durable = DurableResources(capacity)
    retention = {RULE: Retention(horizon_minutes=31 * 1440)}
    writer = IngestWriter(
        store,
        lambda: retention,
        SystemClock(),
        Metrics(),
        WriterConfig(max_pending_keys=1),
        durable=durable,
    )
    ours, theirs = _pair()
    bridge = Bridge(ours, writer, durable, 2.0, lambda samples: None, "grpc-worker-1")
    serving = threading.Thread(target=bridge.serve, daemon=True)
    serving.start()
    worker = _Worker(theirs)
    yield worker, writer, durable
    theirs.close_sending()
    serving.join(10)
    writer.shutdown(5)
    ours.close()
    db.close()


def _result(minute: int, fingerprint: int) -> DecodeResult:
    t = minute * MINUTE_MS + 7_000
    result = DecodeResult()
    result.batch[(RULE, KEY)] = Sighting({minute}, t, t)
    result.marks.append(Mark(fingerprint, minute, t, ((RULE, KEY),)))
    return result


def test_a_durable_write_answers_the_worker_with_its_resources_entries(
    bridged: tuple[_Worker, IngestWriter, DurableResources],
) -> None:
    worker, writer, durable = bridged
    writer.start()
    minute = SystemClock().now_ms() // MINUTE_MS - 5
    assert write_durably(worker.sink, _result(minute, 77), 10.0) == (False, "")
    # The worker's fast path now knows the resource exactly as the service's does.
    assert durable.get(77) is not None
    assert worker.durable.get(77) == durable.get(77)


KEY_2 = ("node-1", "prod", "node-1", "4243", "/tmp/y", "y")


def _marked(minute: int) -> DecodeResult:
    """Two resources (fingerprints 77 and 78) through the full path."""
    t = minute * MINUTE_MS + 7_000
    result = DecodeResult()
    for fp, key in ((77, KEY), (78, KEY_2)):
        result.batch[(RULE, key)] = Sighting({minute}, t, t)
        result.marks.append(Mark(fp, minute, t, ((RULE, key),)))
    return result


def _extension(minute: int) -> DecodeResult:
    """The same two resources' next minute, as the fast path hands it over."""
    result = DecodeResult()
    resources = ((77, (item_of((RULE, KEY)),)), (78, (item_of((RULE, KEY_2)),)))
    result.extension = Extension(minute * MINUTE_MS + 7_000, resources)
    return result


def test_an_extension_answer_leaves_the_worker_with_the_services_entries(
    bridged: tuple[_Worker, IngestWriter, DurableResources],
) -> None:
    """The answer to a logged minute lists no entry for its resources; the worker sets the
    value they hold and keeps their keys: the same entries as the service's."""
    worker, writer, durable = bridged
    writer.start()
    minute = SystemClock().now_ms() // MINUTE_MS - 5
    for m in (minute, minute + 1):  # running: the entries keep the keys
        assert write_durably(worker.sink, _marked(m), 10.0) == (False, "")
    kept = {fp: worker.durable.keys_of(fp) for fp in (77, 78)}
    assert all(kept.values())
    extension = _extension(minute + 2)
    assert write_durably(worker.sink, extension, 10.0) == (False, "")
    assert extension.extension is not None
    for fp in (77, 78):
        assert durable.get(fp) == extension_value(extension.extension)
        assert worker.durable.get(fp) == durable.get(fp)
        assert worker.durable.keys_of(fp) == kept[fp]
    assert writer.healthy


def test_an_extension_the_service_holds_no_entry_for_leaves_the_worker_as_it_was(
    bridged_forgetful: tuple[_Worker, IngestWriter, DurableResources],
) -> None:
    """Where the service process has no entry (evicted, or none kept), the answer says so
    and the worker does not claim the new minute: its next scrape takes the full path."""
    worker, writer, durable = bridged_forgetful
    writer.start()
    minute = SystemClock().now_ms() // MINUTE_MS - 5
    worker.durable.add([(77, 1, (item_of((RULE, KEY)),)), (78, 1, (item_of((RULE, KEY_2)),))])
    assert write_durably(worker.sink, _marked(minute), 10.0) == (False, "")
    assert write_durably(worker.sink, _extension(minute + 1), 10.0) == (False, "")
    assert durable.get(77) is None
    assert worker.durable.get(77) == 1 and worker.durable.get(78) == 1


def test_a_full_write_queue_is_overload_for_the_worker_too(
    bridged: tuple[_Worker, IngestWriter, DurableResources],
) -> None:
    worker, writer, _ = bridged
    minute = SystemClock().now_ms() // MINUTE_MS - 5
    # The writer is not running: the first batch waits in its queue (max 1 key), so the
    # second and third do not fit.
    first = worker.sink.submit(_result(minute, 1).batch)
    second = write_durably(worker.sink, _result(minute + 1, 2), 0.5)
    assert second[0] is True and "write queue full" in second[1]
    writer.start()
    assert first.wait(10) and first.error is None


def test_pending_exports_fail_at_once_when_the_service_process_is_gone() -> None:
    ours, theirs = _pair()
    worker = _Worker(theirs)
    ticket = worker.sink.submit(_result(1000, 5).batch)
    assert ours.recv()[0] == "submit"  # the service got it, then dies before answering
    ours.close()
    assert ticket.wait(5)
    assert isinstance(ticket.error, WriteFailed)
    later = worker.sink.submit(_result(1001, 6).batch)
    assert later.wait(0) and "gone" in str(later.error)
    theirs.close()


def _exposed(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_other_processes_counters_and_histograms_are_summed_and_kept_when_they_exit() -> None:
    service, worker = Metrics(), Metrics()
    service.export_requests.labels(outcome="ok").inc(2)
    worker.export_requests.labels(outcome="ok").inc(5)
    worker.export_requests.labels(outcome="invalid").inc(1)  # only the worker has it
    worker.export_seconds.observe(0.003)
    worker.cache_entries.labels(cache="resources").set(40)
    live: list[object] = [foreign_samples(worker.registry)]
    retired = RetiredSamples()
    service.add_source(lambda: [*retired.samples(), *live[0]])  # type: ignore[misc]
    seen = _exposed(service)
    assert seen[("pathwatch_export_requests_total", (("outcome", "ok"),))] == 7
    assert seen[("pathwatch_export_requests_total", (("outcome", "invalid"),))] == 1
    assert seen[("pathwatch_export_duration_seconds_count", ())] == 1
    assert seen[("pathwatch_export_duration_seconds_bucket", (("le", "0.005"),))] == 1
    assert seen[("pathwatch_cache_entries", (("cache", "resources"),))] == 40
    retired.retire(live[0])  # type: ignore[arg-type]
    live[0] = []
    seen = _exposed(service)
    assert seen[("pathwatch_export_requests_total", (("outcome", "ok"),))] == 7
    assert ("pathwatch_cache_entries", (("cache", "resources"),)) not in seen


@pytest.mark.parametrize("processes", [0, 65])
def test_receiver_processes_out_of_range_are_refused(processes: int) -> None:
    config = Config(receiver=ReceiverConfig(grpc=GrpcReceiverConfig(processes=processes)))
    with pytest.raises(ConfigError, match=r"receiver\.grpc\.processes"):
        validate(config)
