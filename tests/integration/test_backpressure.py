"""Backpressure: when the store cannot keep up, Export answers UNAVAILABLE with RetryInfo."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pathwatch.clock import SystemClock
from pathwatch.config.model import GrpcReceiverConfig
from pathwatch.receiver import Decoder, OtlpGrpcReceiver, TimeBounds
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.store import Database, IngestWriter, Retention, WriterConfig
from pathwatch.telemetry.metrics import Metrics
from tests.support import GatedStore, Proc, export, process_request


@pytest.fixture
def stalled(tmp_path: Path) -> Iterator[tuple[OtlpGrpcReceiver, GatedStore]]:
    db = Database(str(tmp_path / "db"))
    store = GatedStore(db, gate_open=False)
    clock = SystemClock()
    metrics = Metrics()
    retention = {PARITY_RULE.id: Retention(horizon_minutes=31 * 1440)}
    writer = IngestWriter(
        store, lambda: retention, clock, metrics, WriterConfig(max_pending_keys=3)
    )
    writer.start()
    now = clock.now_ms()
    receiver = OtlpGrpcReceiver(
        GrpcReceiverConfig(listen="127.0.0.1:0", ack_timeout=1.0),
        Decoder([PARITY_RULE]),
        writer,
        lambda: TimeBounds(now - 86_400_000, now + 300_000),
        metrics,
    )
    receiver.start()
    yield receiver, store
    store.gate.set()
    receiver.shutdown(1)
    writer.shutdown(5)
    db.close()


def _retry_delay(err: grpc.RpcError) -> float:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    raise AssertionError("no RetryInfo in the status details")


def test_full_queue_answers_unavailable_with_retry_info(
    stalled: tuple[OtlpGrpcReceiver, GatedStore],
) -> None:
    """With the writer stuck and its queue full, a new export is refused at once with
    UNAVAILABLE + RetryInfo (the collector retries); nothing queues without bound."""
    receiver, store = stalled
    assert receiver.port
    now = time.time_ns() // 1_000_000
    outcomes: list[grpc.StatusCode] = []

    def blocked_export(procs: list[Proc]) -> None:
        try:
            export(receiver.port or 0, process_request(procs, now))
        except grpc.RpcError as exc:
            outcomes.append(exc.code())

    first = threading.Thread(target=blocked_export, args=([Proc(1, "/a")],), daemon=True)
    first.start()
    assert store.entered.wait(10)
    # 1 key in the stuck write + 2 queued = the bound of 3 keys
    procs = [Proc(i, f"/b{i}") for i in range(2)]
    second = threading.Thread(target=blocked_export, args=(procs,), daemon=True)
    second.start()
    time.sleep(0.3)  # let the second batch take the queue's room
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        export(receiver.port, process_request([Proc(9, "/c")], now))
    assert time.monotonic() - started < 1.0  # refused at once, not after the ack timeout
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "overloaded" in (err.value.details() or "")
    assert _retry_delay(err.value) > 0
    first.join(5)
    second.join(5)
    assert outcomes == [grpc.StatusCode.UNAVAILABLE] * 2  # both timed out waiting, retryable


def test_slow_write_answers_unavailable_after_ack_timeout(
    stalled: tuple[OtlpGrpcReceiver, GatedStore],
) -> None:
    """An export whose write does not become durable within ack_timeout gets UNAVAILABLE
    with RetryInfo, never a success it could not honour."""
    receiver, _ = stalled
    assert receiver.port
    now = time.time_ns() // 1_000_000
    with pytest.raises(grpc.RpcError) as err:
        export(receiver.port, process_request([Proc(1, "/a")], now))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _retry_delay(err.value) > 0
