"""`receiver.grpc.processes`: the OTLP/gRPC endpoint served by worker processes (app/workers.py)
that decode and hand their results to the service process, which alone writes. Real service
processes, real gRPC clients, real RocksDB; workers killed with SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import yaml
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms

from tests.support import (
    EXPORT,
    Proc,
    ServiceProcess,
    iso,
    now_ms,
    process_request,
    wait_until,
)

PROCS = [Proc(5000 + i, f"/srv/app/part-{i}") for i in range(6)]
WORKERS = {"receiver": {"grpc": {"processes": 2}}}


@contextmanager
def collector(port: int) -> Iterator[grpc.UnaryUnaryMultiCallable]:
    """One connection for every Export, as a collector keeps: so one worker serves it."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", compression=grpc.Compression.Gzip) as ch:
        yield ch.unary_unary(
            EXPORT,
            request_serializer=ms.ExportMetricsServiceRequest.SerializeToString,
            response_deserializer=ms.ExportMetricsServiceResponse.FromString,
        )


def sample(svc: ServiceProcess, name: str, labels: str = "") -> float:
    status, text = svc.api("GET", "/metrics")
    assert status == 200
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", str(text), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def worker_pids(svc: ServiceProcess) -> list[int]:
    for line in svc.lines:
        if "listening in worker processes" in line:
            pids: list[int] = json.loads(line)["pids"]
            return pids
    raise AssertionError("no worker start line")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def keys(svc: ServiceProcess) -> dict[str, dict[str, object]]:
    _, body = svc.api("GET", "/api/v1/keys?path=/srv/app/*&limit=100")
    return {k["key"]["process.executable.path"]: k for k in body["keys"]}


def test_workers_acknowledge_durable_writes_and_log_running_minutes(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    svc = service_factory(tmp_path / "data", WORKERS).start()
    pids = worker_pids(svc)
    assert len(pids) == 2 and all(alive(p) for p in pids)
    first = now_ms() // 60_000 - 20
    with collector(svc.grpc_port) as call:
        for minute in range(first, first + 4):
            response = call(process_request(PROCS, minute * 60_000 + 7_000), timeout=10)
            assert not response.partial_success.rejected_data_points
    # The worker learnt from the service's answers which resources are durable, so from the
    # third minute on it sent only the minutes to log (store/extend.py), as one process does.
    assert sample(svc, "pathwatch_store_minutes_logged_total") == 12
    found = keys(svc)
    assert len(found) == 6
    assert found["/srv/app/part-3"]["presence"] == [[iso(first * 60_000),
                                                     iso((first + 4) * 60_000)]]  # fmt: skip
    # What the workers counted reaches the service's /metrics (sent every second).
    wait_until(lambda: sample(svc, "pathwatch_export_requests_total", '{outcome="ok"}') == 4)
    assert sample(svc, "pathwatch_resources_total", '{outcome="tracked"}') == 24
    assert sample(svc, "pathwatch_data_points_total", '{outcome="accepted"}') > 0
    status, body = svc.api("GET", "/readyz")
    assert status == 200 and body["checks"]["receiver"] == "ok"
    assert svc.stop() == 0
    wait_until(lambda: not any(alive(p) for p in pids), timeout=10)


def test_kill_9_of_the_service_stops_its_workers_and_loses_no_acknowledged_minute(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    data = tmp_path / "data"
    svc = service_factory(data, WORKERS).start()
    pids = worker_pids(svc)
    first = now_ms() // 60_000 - 20
    with collector(svc.grpc_port) as call:
        for minute in range(first, first + 4):
            call(process_request(PROCS, minute * 60_000 + 7_000), timeout=10)
    before = keys(svc)
    svc.kill()
    # A worker whose service process is gone fails what it holds and exits: no orphan
    # keeps the port, answering Exports nobody writes.
    wait_until(lambda: not any(alive(p) for p in pids), timeout=10)
    svc = service_factory(data, WORKERS).start()
    wait_until(lambda: keys(svc) == before, timeout=10)
    svc.stop()


def test_a_killed_worker_is_started_again_while_the_other_serves(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    svc = service_factory(tmp_path / "data", WORKERS).start()
    victim = worker_pids(svc)[0]
    first = now_ms() // 60_000 - 20
    with collector(svc.grpc_port) as call:
        call(process_request(PROCS, first * 60_000 + 7_000), timeout=10)
    wait_until(lambda: sample(svc, "pathwatch_export_requests_total", '{outcome="ok"}') == 1)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: sample(
            svc, "pathwatch_component_failures_total", '{component="grpc-worker-1"}'
        ) == 1,
        timeout=10,
    )  # fmt: skip
    wait_until(lambda: any("receiver worker started again" in line for line in svc.lines), 15)
    wait_until(lambda: svc.api("GET", "/readyz")[1]["checks"]["receiver"] == "ok", timeout=10)
    # New connections reach a live worker; what the dead worker counted is still counted.
    sent = 0
    deadline = time.monotonic() + 20
    while sent < 3 and time.monotonic() < deadline:
        with collector(svc.grpc_port) as call:
            try:
                call(process_request(PROCS, (first + 1 + sent) * 60_000 + 7_000), timeout=5)
                sent += 1
            except grpc.RpcError as exc:  # a connection that raced the restart: retried
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
    assert sent == 3
    wait_until(lambda: sample(svc, "pathwatch_export_requests_total", '{outcome="ok"}') >= 4)
    assert len(keys(svc)) == 6
    assert svc.stop() == 0


def test_a_port_the_workers_cannot_bind_is_named(tmp_path: Path) -> None:
    holder = socket.socket()  # bound without SO_REUSEPORT: nobody may share it
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = {
        "data_dir": str(tmp_path / "data"),
        "receiver": {
            "grpc": {"listen": f"127.0.0.1:{port}", "processes": 2},
            "http": {"listen": ""},
        },
        "http": {"listen": "127.0.0.1:0"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHWATCH_")}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pathwatch", "serve", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        holder.close()
    assert done.returncode != 0
    assert "receiver.grpc" in done.stderr + done.stdout
    assert f"127.0.0.1:{port}" in done.stderr + done.stdout
