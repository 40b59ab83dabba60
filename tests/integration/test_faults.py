"""Faults: a full disk, kill -9 during ingest and during evaluation."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support import (
    Proc,
    ServiceProcess,
    export,
    iso,
    minute_floor,
    process_request,
    wait_until,
)

pytestmark = pytest.mark.integration


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs: a disk that can really fill up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def fill(path: Path) -> None:
    with path.open("wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 20))
                fh.flush()
        except OSError:
            pass


def test_disk_full_is_retryable_and_heals(
    small_disk: Path, service_factory: type[ServiceProcess]
) -> None:
    """With the disk full, Export answers UNAVAILABLE and /readyz is 503 naming the reason;
    once space is freed, writes succeed again and the service is ready, without a restart."""
    svc = service_factory(small_disk / "data").start()
    t = now_ms() - 60_000
    export(svc.grpc_port, process_request([Proc(1, "/bin/ok")], t))
    filler = small_disk / "filler"
    fill(filler)
    codes = []
    for i in range(30):
        big = [Proc(10_000 * i + j, f"/opt/{'x' * 200}/{i}/{j}") for j in range(200)]
        try:
            export(svc.grpc_port, process_request(big, t))
        except grpc.RpcError as exc:
            codes.append(exc.code())
            break
    assert codes == [grpc.StatusCode.UNAVAILABLE]
    status, body = svc.api("GET", "/readyz")
    assert status == 503
    assert "space" in body["checks"]["store"].lower()
    filler.unlink()

    def accepted() -> bool:
        try:
            export(svc.grpc_port, process_request([Proc(2, "/bin/after")], t))
            return True
        except grpc.RpcError:
            return False

    wait_until(accepted, timeout=20, interval=0.5)
    assert svc.api("GET", "/readyz")[0] == 200
    keys = svc.api("GET", "/api/v1/keys?path=/bin/*")[1]["keys"]
    assert {k["key"]["process.executable.path"] for k in keys} == {"/bin/ok", "/bin/after"}
    assert svc.proc is not None and svc.proc.poll() is None


def test_kill_9_during_ingest_keeps_every_acknowledged_export(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """Exports acknowledged before a kill -9 in the middle of a stream are all there after
    the restart."""
    data = tmp_path / "data"
    svc = service_factory(data).start()
    acked: list[int] = []
    stop = threading.Event()
    t = now_ms() - 60_000

    def sender(worker: int) -> None:
        n = 0
        while not stop.is_set():
            batch = worker * 1_000_000 + n
            procs = [Proc(batch * 10 + j, f"/acked/{batch}/{j}") for j in range(10)]
            try:
                export(svc.grpc_port, process_request(procs, t), timeout=5)
            except grpc.RpcError:
                return
            acked.append(batch)
            n += 1

    threads = [threading.Thread(target=sender, args=(w,), daemon=True) for w in range(4)]
    for th in threads:
        th.start()
    wait_until(lambda: len(acked) >= 40, timeout=30)
    svc.kill()
    stop.set()
    for th in threads:
        th.join(10)
    expected = {f"/acked/{b}/{j}" for b in acked for j in range(10)}
    svc2 = service_factory(data).start()
    _, body = svc2.api("GET", "/api/v1/keys?path=/acked/*&limit=10000")
    stored = {k["key"]["process.executable.path"] for k in body["keys"]}
    assert expected <= stored


def test_kill_9_during_evaluation_reruns_without_duplicates(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """A tick interrupted by kill -9 runs again after the restart and yields each alert once,
    with the same ids a clean run yields."""
    data = tmp_path / "data"
    config = {"limits": {"max_alerts_per_tick": 5000}}
    svc = service_factory(data, config).start()
    t = minute_floor(now_ms())
    for chunk in range(10):
        procs = [Proc(chunk * 1000 + j, f"/tmp/evil-{chunk}-{j}") for j in range(200)]
        export(svc.grpc_port, process_request(procs, t - 120_000))

    def evaluate_until_killed() -> None:
        # The connection dies with the process: that is the point.
        with contextlib.suppress(OSError, AssertionError):
            svc.evaluate(t)

    threading.Thread(target=evaluate_until_killed, daemon=True).start()
    time.sleep(0.15)
    svc.kill()
    svc2 = service_factory(data, config).start()
    result = svc2.evaluate(t)
    ids = [a["id"] for a in result["alerts"]]
    assert len(ids) == 2000 and len(set(ids)) == 2000
    _, listed = svc2.api("GET", f"/api/v1/alerts?since={iso(t - 60_000)}&limit=10000")
    listed_ids = [a["id"] for a in listed["alerts"]]
    assert sorted(listed_ids) == sorted(ids)
