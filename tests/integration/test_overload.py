"""Overload: more exports than the store can take answer 'retry later', memory stays bounded,
and nothing acknowledged is lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.support import Proc, ServiceProcess, export, process_request

pytestmark = pytest.mark.integration


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_overload_is_pushed_back_without_losing_acknowledged_data(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """16 clients sending new keys as fast as they can for 4 s: some exports get
    UNAVAILABLE or RESOURCE_EXHAUSTED (retryable), RSS stays bounded, and every key of an
    acknowledged export is stored."""
    svc = service_factory(
        tmp_path / "data", {"store": {"max_pending_keys": 1000}, "limits": {"new_keys_per_hour": 0,
                            "new_keys_per_host_per_hour": 0}},
    ).start()  # fmt: skip
    assert svc.proc is not None
    t = time.time_ns() // 1_000_000 - 60_000
    acked: list[int] = []
    refused: dict[grpc.StatusCode, int] = {}
    stop = threading.Event()
    lock = threading.Lock()
    peak = [0]

    def client(worker: int) -> None:
        n = 0
        while not stop.is_set():
            batch = worker * 100_000 + n
            n += 1
            procs = [Proc(j, f"/load/{batch}/{j}", host=f"n{worker}") for j in range(200)]
            try:
                export(svc.grpc_port, process_request(procs, t), timeout=10)
            except grpc.RpcError as exc:
                with lock:
                    refused[exc.code()] = refused.get(exc.code(), 0) + 1
                continue
            with lock:
                acked.append(batch)

    def sample() -> None:
        assert svc.proc is not None
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(svc.proc.pid))
            time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(16)]
    threads.append(threading.Thread(target=sample, daemon=True))
    for th in threads:
        th.start()
    time.sleep(4)
    stop.set()
    for th in threads:
        th.join(15)
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert sum(refused.values()) > 0, "the load never reached the bound"
    assert acked, "nothing was accepted"
    assert peak[0] < 400 * 1024, f"peak RSS {peak[0]} KiB"
    for batch in acked[:: max(1, len(acked) // 25)]:
        _, body = svc.api("GET", f"/api/v1/keys?path=/load/{batch}/*&limit=1000")
        assert len(body["keys"]) == 200, f"acknowledged batch {batch} incomplete"
