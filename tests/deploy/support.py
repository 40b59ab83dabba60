"""Shared checks for the deployment artefacts: Kubernetes schemas and pathwatch's own validation."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "pathwatch"
DEPLOY = ROOT / "deploy"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent release; both
# are bundled by kubernetes-validate, so validation is offline.
KUBE_VERSIONS = ("1.25", "1.33")

# Prometheus Operator kinds: not in the Kubernetes schemas, checked structurally instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

# The ports every artefact exposes, by Kubernetes port name: OTLP/gRPC (receiver.grpc.listen),
# OTLP/HTTP (receiver.http.listen) and admin HTTP (http.listen), pathwatch's default listen ports.
PORTS = {"grpc": 4317, "otlp-http": 4318, "http": 8080}

# Where the chart and deploy/pathwatch.yaml mount the admin API's token (a Secret's key
# "token"), the file config http.auth.bearer_token_file names; and a token to put there.
API_TOKEN_FILE = "/etc/pathwatch-api-token/token"
API_TOKEN = {API_TOKEN_FILE: "an-api-token-for-check-config"}

# A well-formed Standard Webhooks secret, for configs whose webhook sink reads secret_env.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"pathwatch deploy test key").decode()

Manifest = dict[str, Any]


def load_manifests(text: str) -> list[Manifest]:
    """Every non-empty document of a multi-document YAML stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def validate_kubernetes(obj: Manifest) -> None:
    """Strict schema validation (unknown fields are errors) against every KUBE_VERSIONS."""
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            raise AssertionError(
                f"{where} is invalid for Kubernetes {version} at /{path}: {exc.message}"
            ) from None


def check_config(
    text: str,
    tmp_path: Path,
    secrets: Mapping[str, str] | None = None,
    files: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`pathwatch check-config` on `text`, with no PATHWATCH_* variables but `secrets`.

    `files` maps a path the config names inside the container (a mounted Secret's file) to
    the content it has there: each is written under `tmp_path` and the config points to it.
    """
    for n, (mounted, content) in enumerate((files or {}).items()):
        local = tmp_path / f"mounted-{n}"
        local.write_text(content, encoding="utf-8")
        assert mounted in text, f"{mounted} is not in the config"
        text = text.replace(mounted, str(local))
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHWATCH_")}
    env.update(secrets or {})
    return subprocess.run(
        [sys.executable, "-m", "pathwatch", "check-config", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def by_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Manifest], kind: str) -> Manifest:
    """The single object of `kind`; fails if there is none or several."""
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def listen_port(address: str) -> int:
    """The port of a HOST:PORT listen address."""
    return int(address.rpartition(":")[2])
