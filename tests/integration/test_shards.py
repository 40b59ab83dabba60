"""Issue 15: pathwatch as one shard of several, each owning whole clusters; a cluster moves
between shards with its baseline, and its alerts keep their ids."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    RULE,
    Proc,
    ServiceProcess,
    export,
    minute_floor,
    now_ms,
    process_request,
)

FLEET = [Proc(10 + i, f"/usr/bin/d{i}", cluster="prod-eu", host=f"eu-{i}") for i in range(4)]
OTHER = [Proc(50 + i, f"/usr/bin/d{i}", cluster="staging", host=f"st-{i}") for i in range(3)]
IMPLANT = Proc(31337, "/tmp/.x/kworkerd", cluster="prod-eu", host="eu-1")


def _service(tmp_path: Path, name: str, config: dict[str, Any]) -> ServiceProcess:
    rules = [{"id": RULE, "no_baseline": "summarize"}]
    return ServiceProcess(tmp_path / name, {"rules": rules, **config}).start()


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for svc in started:
        svc.stop()


def _clusters(svc: ServiceProcess) -> set[str]:
    status, body = svc.api("GET", "/api/v1/keys?path=*&limit=10000")
    assert status == 200, body
    return {k["key"]["k8s.cluster.name"] for k in body["keys"]}


def test_a_shard_refuses_clusters_it_does_not_own(
    tmp_path: Path, shards: list[ServiceProcess]
) -> None:
    """Resources of a cluster outside shard.clusters are refused through partial_success with
    a message naming the cluster, counted by reason, and nothing of them is stored."""
    svc = _service(tmp_path, "eu", {"shard": {"name": "eu", "clusters": ["prod-*"]}})
    shards.append(svc)
    t = minute_floor(now_ms())
    response = export(svc.grpc_port, process_request([*FLEET, *OTHER], t - 60_000))
    assert response.partial_success.rejected_data_points == 3 * 4
    assert "cluster 'staging'" in response.partial_success.error_message
    assert "does not own" in response.partial_success.error_message
    assert _clusters(svc) == {"prod-eu"}
    _, text = svc.api("GET", "/metrics")
    assert 'pathwatch_resources_untracked_total{reason="not_owned"} 3.0' in text
    assert 'pathwatch_shard_info{clusters="prod-*",shard="eu"} 1.0' in text


def test_a_cluster_moves_with_its_baseline_and_keeps_its_alert_ids(
    tmp_path: Path, shards: list[ServiceProcess]
) -> None:
    """The old shard exports one cluster's state (CLI over the API), the new shard imports it
    while running: the first tick on the new shard alerts the implant alone (no no-baseline
    summary), with the same id the old shard gives it, and nothing of other clusters moved."""
    old = _service(tmp_path, "old", {})
    new = _service(tmp_path, "new", {"shard": {"name": "eu", "clusters": ["prod-eu"]}})
    shards.extend([old, new])
    t = minute_floor(now_ms())
    export(old.grpc_port, process_request([*FLEET, *OTHER], t - 3 * 3_600_000))
    baseline = tmp_path / "prod-eu.baseline"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cli = [sys.executable, "-m", "pathwatch", "baseline"]
    url = f"http://127.0.0.1:{old.http_port}"
    run = subprocess.run(
        [*cli, "export", str(baseline), "--api", url, "--cluster", "prod-eu"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    url = f"http://127.0.0.1:{new.http_port}"
    run = subprocess.run(
        [*cli, "import", str(baseline), "--api", url],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "4 key(s) merged" in run.stderr
    assert _clusters(new) == {"prod-eu"}
    again = subprocess.run(  # idempotent
        [*cli, "import", str(baseline), "--api", url],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr

    for svc in (old, new):
        export(svc.grpc_port, process_request([*FLEET, IMPLANT], t - 5 * 60_000))
    on_old = old.evaluate(t)["alerts"]
    on_new = new.evaluate(t)["alerts"]
    assert [a.get("kind") for a in on_new] == [None]
    assert [a["id"] for a in on_new] == [a["id"] for a in on_old]
    assert on_new[0]["fields"]["process.executable.path"] == IMPLANT.path
    # The context ("seen on N nodes") moved with the cluster, counts included.
    assert on_new[0]["context"] == on_old[0]["context"]


def test_a_cluster_new_to_a_shard_is_summarised(
    tmp_path: Path, shards: list[ServiceProcess]
) -> None:
    """Without its baseline, a cluster arriving at a shard raises one no-baseline summary,
    not an alert per process."""
    new = _service(tmp_path, "new", {"shard": {"clusters": ["prod-eu"]}})
    shards.append(new)
    t = minute_floor(now_ms())
    export(new.grpc_port, process_request([*FLEET, IMPLANT], t - 5 * 60_000))
    (summary,) = new.evaluate(t)["alerts"]
    assert summary["kind"] == "no_baseline" and summary["keys"][0]["path"] == IMPLANT.path
