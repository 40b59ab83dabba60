"""The Helm chart, rendered offline by the Helm SDK (helm_python) as `helm template` would."""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from pathwatch.config import Config
from pathwatch.telemetry.metrics import Metrics
from tests.deploy.support import (
    API_TOKEN,
    API_TOKEN_FILE,
    CHART,
    CRD_KINDS,
    DEPLOY,
    PORTS,
    WEBHOOK_SECRET,
    Manifest,
    by_kind,
    check_config,
    listen_port,
    load_manifests,
    one,
    validate_kubernetes,
)

RELEASE, NAMESPACE = "pw", "sec"
FULLNAME = "pw-pathwatch"
SELECTOR = f'job="{FULLNAME}", namespace="{NAMESPACE}"'

# Everything optional switched on, as a production install would.
CUSTOM: dict[str, Any] = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "alertLabels": {"team": "secops"}},
    "networkPolicy": {
        "enabled": True,
        "egress": {
            "enabled": True,
            "rules": [
                {
                    "to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}],
                    "ports": [{"protocol": "TCP", "port": 443}],
                }
            ],
        },
    },
    "secretEnv": [
        {"name": "PATHWATCH_WEBHOOK_SECRET", "secretName": "pathwatch-webhook", "key": "secret"},
        {"name": "SPLUNK_HEC_TOKEN", "secretName": "splunk-hec", "key": "token"},
        {"name": "PATHWATCH_RECEIVER_TOKEN", "secretName": "pathwatch-receiver", "key": "token"},
    ],
    "persistence": {"existingClaim": "pathwatch-data"},
    "config": {
        "receiver": {"grpc": {"auth": {"bearer_token_env": "PATHWATCH_RECEIVER_TOKEN"}}},
        "log": {"level": "debug", "format": "json"},
        "store": {"cache_keys": 200000, "block_cache_size": "128MiB"},
        "rules": [
            {
                "id": "kubernetes_process_running_from_new_path",
                "schedule": "0 * * * *",
                "exclude": [{"field": "process.executable.path", "glob": "/usr/lib/jvm/*"}],
            }
        ],
        "sinks": [
            {
                "name": "soc",
                "type": "webhook",
                "url": "https://soc.example.com/hooks/pathwatch",
                "secret_env": "PATHWATCH_WEBHOOK_SECRET",
            },
            {
                "name": "splunk",
                "type": "splunk_hec",
                "url": "https://splunk.example.com:8088",
                "token_env": "SPLUNK_HEC_TOKEN",
            },
        ],
    },
}
SECRETS = {
    "PATHWATCH_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "SPLUNK_HEC_TOKEN": "hec-token",
    "PATHWATCH_RECEIVER_TOKEN": "receiver-token",
}

ALERTS = {
    "PathwatchDeliveryFailing": 'rate(pathwatch_deliveries_total{outcome="failed"',
    "PathwatchDeadLetters": "pathwatch_deadletters{",
    "PathwatchSinkDisabled": "pathwatch_sink_disabled{",
    "PathwatchOutboxBacklog": "pathwatch_outbox_oldest_age_seconds{",
    "PathwatchEvaluationStale": "time() - pathwatch_last_tick_timestamp_seconds{",
    "PathwatchStoreWriteErrors": "increase(pathwatch_store_write_errors_total{",
    "PathwatchIngestRejecting": 'rate(pathwatch_export_requests_total{outcome="unavailable"',
    "PathwatchKeyLimitReached": "increase(pathwatch_key_limit_hits_total{",
}


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def render_files(chart: helm_python.Chart, values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template file name (without the chart prefix) -> rendered text."""
    files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return {name.split("/templates/", 1)[1]: text for name, text in files.items()}


def render(chart: helm_python.Chart, values: dict[str, Any] | None = None) -> list[Manifest]:
    files = render_files(chart, values)
    return [
        obj
        for name, text in sorted(files.items())
        if name.endswith(".yaml")
        for obj in load_manifests(text)
    ]


@pytest.fixture(scope="module")
def default(chart: helm_python.Chart) -> list[Manifest]:
    return render(chart)


@pytest.fixture(scope="module")
def custom(chart: helm_python.Chart) -> list[Manifest]:
    return render(chart, CUSTOM)


def pod_spec(objects: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(objects: list[Manifest]) -> dict[str, Any]:
    (c,) = pod_spec(objects)["containers"]
    return dict(c)


def config_map(objects: list[Manifest]) -> Manifest:
    """pathwatch's configuration ConfigMap (not the Grafana dashboard's)."""
    (found,) = [o for o in by_kind(objects, "ConfigMap") if "config.yaml" in o["data"]]
    return found


def config_text(objects: list[Manifest]) -> str:
    text: str = config_map(objects)["data"]["config.yaml"]
    return text


def service_ports(objects: list[Manifest]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in one(objects, "Service")["spec"]["ports"]}


def container_ports(objects: list[Manifest]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(objects)["ports"]}


def checksum(objects: list[Manifest]) -> str:
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    value: str = annotations["checksum/config"]
    return value


# -- the chart as a whole ----------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, CUSTOM], ids=["default", "custom"])
def test_chart_lints_without_warnings(values: dict[str, Any] | None) -> None:
    """`helm lint --strict` reports no warning or error for default and custom values."""
    report = helm_python.lint(CHART, values, strict=True, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == [], report


def test_default_install_creates_the_core_objects(default: list[Manifest]) -> None:
    """With default values: ConfigMap, PVC, ServiceAccount, Service, Deployment, the
    NetworkPolicy, the admin token's Secret and the Grafana dashboard's ConfigMap, nothing that
    needs the Prometheus Operator."""
    kinds = sorted(o["kind"] for o in default)
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    assert {o["metadata"]["namespace"] for o in default} == {NAMESPACE}


@pytest.mark.parametrize("values", [None, CUSTOM], ids=["default", "custom"])
def test_every_object_is_valid_for_kubernetes(
    chart: helm_python.Chart, values: dict[str, Any] | None
) -> None:
    """Each rendered Kubernetes object passes the API schema strictly (no unknown fields);
    Prometheus Operator objects are checked for the fields the operator requires."""
    objects = render(chart, values)
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["metadata"]["name"] == FULLNAME
            assert isinstance(obj["spec"], dict)
        else:
            validate_kubernetes(obj)


def test_schema_validation_catches_an_invalid_object() -> None:
    """The Kubernetes validation used here rejects a misspelled field (it is not vacuous)."""
    broken = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 4317, "targetPort": "grpc", "appProtocl": "grpc"}]},
    }
    with pytest.raises(AssertionError, match="appProtocl"):
        validate_kubernetes(broken)


# -- the Deployment ----------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, CUSTOM], ids=["default", "custom"])
def test_single_replica_replaced_with_recreate(
    chart: helm_python.Chart, values: dict[str, Any] | None
) -> None:
    """One replica, Recreate strategy: the old pod releases the RocksDB lock before the new one
    opens the data dir."""
    deployment = one(render(chart, values), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_probes_use_health_endpoints_on_the_http_port(default: list[Manifest]) -> None:
    """Liveness asks /healthz, readiness /readyz, both on the named http port (8080)."""
    c = container(default)
    http = {"port": "http", "scheme": "HTTP"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", **http}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", **http}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", **http}
    assert container_ports(default) == {"grpc": 4317, "otlp-http": 4318, "http": 8080}
    assert container_ports(default) == PORTS


def test_pod_is_non_root_read_only_and_without_capabilities(default: list[Manifest]) -> None:
    """uid/fsGroup 10001, runAsNonRoot, read-only root, no privilege escalation, every
    capability dropped, RuntimeDefault seccomp, no API token."""
    pod = pod_spec(default)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["fsGroup"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container(default)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_writable_paths_are_the_data_volume_and_tmp(default: list[Manifest]) -> None:
    """The data dir is the PVC at /var/lib/pathwatch, /tmp an emptyDir, the config a read-only
    ConfigMap mount passed to `pathwatch serve --config`."""
    c = container(default)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(default)["volumes"]}
    assert volumes[mounts["/var/lib/pathwatch"]["name"]]["persistentVolumeClaim"] == {
        "claimName": FULLNAME
    }
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/etc/pathwatch"]["readOnly"] is True
    assert volumes[mounts["/etc/pathwatch"]["name"]]["configMap"] == {"name": FULLNAME}
    assert c["args"][:3] == ["serve", "--config", "/etc/pathwatch/config.yaml"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PATHWATCH_DATA_DIR"] == yaml.safe_load(config_text(default))["data_dir"]
    pvc = one(default, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_resources_have_requests_and_a_memory_limit(default: list[Manifest]) -> None:
    """Default requests 250m CPU / 512Mi and a 1Gi memory limit."""
    assert container(default)["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"memory": "1Gi"},
    }


def test_shutdown_timeout_fits_the_grace_period(chart: helm_python.Chart) -> None:
    """pathwatch's --shutdown-timeout stays 10 s under terminationGracePeriodSeconds."""
    objects = render(chart, {"terminationGracePeriodSeconds": 60})
    args = container(objects)["args"]
    assert args[args.index("--shutdown-timeout") + 1] == "50"
    assert pod_spec(objects)["terminationGracePeriodSeconds"] == 60


def test_container_ports_follow_the_configured_listen_addresses(chart: helm_python.Chart) -> None:
    """Changing receiver.grpc.listen or receiver.http.listen moves the container port; the
    Service keeps 4317 and 4318 and targets the ports by name."""
    receiver = {"grpc": {"listen": "0.0.0.0:14317"}, "http": {"listen": ":14318"}}
    objects = render(chart, {"config": {"receiver": receiver}})
    ports = container_ports(objects)
    assert ports["grpc"] == 14317
    assert ports["otlp-http"] == 14318
    service = service_ports(objects)
    assert service["grpc"]["port"] == 4317
    assert service["grpc"]["targetPort"] == "grpc"
    assert service["otlp-http"]["port"] == 4318
    assert service["otlp-http"]["targetPort"] == "otlp-http"


def test_empty_http_receiver_listen_turns_the_otlp_http_port_off(
    chart: helm_python.Chart, tmp_path: Path
) -> None:
    """receiver.http.listen "" reaches pathwatch as "" (not the chart's 0.0.0.0:4318), and the
    container, the Service, the NetworkPolicy and NOTES.txt drop the OTLP/HTTP port."""
    values = {
        "config": {"receiver": {"http": {"listen": ""}}},
        "networkPolicy": {"enabled": True},
    }
    objects = render(chart, values)
    for obj in objects:
        validate_kubernetes(obj)
    text = config_text(objects)
    assert yaml.safe_load(text)["receiver"]["http"] == {"listen": ""}
    assert container_ports(objects) == {"grpc": 4317, "http": 8080}
    assert service_ports(objects).keys() == {"grpc", "http"}
    policy = one(objects, "NetworkPolicy")
    named = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert named == {"grpc", "http"}
    notes = render_files(chart, values)["NOTES.txt"]
    assert "otlphttp" not in notes
    assert ":4318" not in notes
    result = check_config(text, tmp_path, files=API_TOKEN)
    assert result.returncode == 0, result.stderr


def test_otlp_http_port_is_https_with_receiver_tls(chart: helm_python.Chart) -> None:
    """With receiver.http.tls set, the Service's otlp-http appProtocol and the URL NOTES.txt
    gives are HTTPS; the admin port stays HTTP."""
    tls = {"cert_file": "/etc/pathwatch-tls/tls.crt", "key_file": "/etc/pathwatch-tls/tls.key"}
    values = {"config": {"receiver": {"http": {"tls": tls}}}}
    ports = service_ports(render(chart, values))
    assert ports["otlp-http"]["appProtocol"] == "https"
    assert ports["http"]["appProtocol"] == "http"
    notes = render_files(chart, values)["NOTES.txt"]
    assert f"https://{FULLNAME}.{NAMESPACE}.svc:4318" in notes


def test_image_defaults_to_app_version_and_a_digest_wins(chart: helm_python.Chart) -> None:
    """image.tag defaults to the chart's appVersion; image.digest pins by digest."""
    assert container(render(chart))["image"] == f"pathwatch:{chart.metadata['appVersion']}"
    digest = "sha256:" + "a" * 64
    objects = render(
        chart, {"image": {"repository": "registry.example/pathwatch", "digest": digest}}
    )
    assert container(objects)["image"] == f"registry.example/pathwatch@{digest}"


def test_probes_and_scrapes_switch_to_https_with_admin_tls(chart: helm_python.Chart) -> None:
    """With http.tls set, the probes, the ServiceMonitor and the Service's appProtocol use
    HTTPS."""
    tls = {"cert_file": "/etc/pathwatch-tls/tls.crt", "key_file": "/etc/pathwatch-tls/tls.key"}
    objects = render(
        chart,
        {
            "config": {"http": {"tls": tls}},
            "serviceMonitor": {"enabled": True, "tlsConfig": {"insecureSkipVerify": True}},
        },
    )
    c = container(objects)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS"
    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {"insecureSkipVerify": True}
    ports = {p["name"]: p for p in one(objects, "Service")["spec"]["ports"]}
    assert ports["http"]["appProtocol"] == "https"


def test_token_protected_probes_are_refused_while_probes_are_on(chart: helm_python.Chart) -> None:
    """http.protect_probes would make the kubelet's probes fail, so rendering stops with a
    message; with the probes disabled it renders."""
    config = {"http": {"protect_probes": True, "auth": {"bearer_token_env": "API_TOKEN"}}}
    with pytest.raises(helm_python.HelmError, match="protect_probes"):
        render(chart, {"config": config})
    off = {"enabled": False}
    objects = render(
        chart,
        {"config": config, "startupProbe": off, "livenessProbe": off, "readinessProbe": off},
    )
    assert "livenessProbe" not in container(objects)


# -- the admin API token ----------------------------------------------------------------------


def token_volume(objects: list[Manifest]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The container's mount of the file http.auth.bearer_token_file names, and its volume."""
    token_file = yaml.safe_load(config_text(objects))["http"]["auth"]["bearer_token_file"]
    directory, _, key = token_file.rpartition("/")
    (mount,) = [m for m in container(objects)["volumeMounts"] if m["mountPath"] == directory]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod_spec(objects)["volumes"] if v["name"] == mount["name"]]
    assert [(i["key"], i["path"]) for i in volume["secret"]["items"]] == [(key, key)]
    return mount, volume


def test_admin_api_is_guarded_by_a_generated_token_by_default(
    chart: helm_python.Chart, default: list[Manifest], tmp_path: Path
) -> None:
    """Without adminToken values the chart creates a Secret with a random 32-character token,
    mounts it read-only and points http.auth.bearer_token_file at it; the admin API listens on
    every interface (pathwatch's own default is loopback) and the config passes check-config."""
    secret = one(default, "Secret")
    validate_kubernetes(secret)
    assert secret["metadata"]["name"] == f"{FULLNAME}-api-token"
    assert secret["type"] == "Opaque"
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", token), token
    again = base64.b64decode(one(render(chart), "Secret")["data"]["token"]).decode()
    assert again != token, "the token must be random, not a constant of the chart"
    mount, volume = token_volume(default)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] == 0o440
    assert f"{mount['mountPath']}/token" == API_TOKEN_FILE
    config = yaml.safe_load(config_text(default))
    assert config["http"] == {
        "listen": "0.0.0.0:8080",
        "auth": {"bearer_token_file": API_TOKEN_FILE},
    }
    assert Config().http.listen.startswith("127.0.0.1:")
    result = check_config(config_text(default), tmp_path, files={API_TOKEN_FILE: token})
    assert result.returncode == 0, result.stderr


def test_probes_and_metrics_stay_open_with_the_token(default: list[Manifest]) -> None:
    """The token guards /api/ only: the probes ask /healthz and /readyz without credentials,
    and protect_probes is not set (the kubelet and Prometheus cannot send the token)."""
    c = container(default)
    assert {
        c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")
    } == {
        "/healthz",
        "/readyz",
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "httpHeaders" not in c[probe]["httpGet"]
    config = yaml.safe_load(config_text(default))
    assert config["http"]["auth"] == {"bearer_token_file": API_TOKEN_FILE}
    assert "protect_probes" not in config["http"]


def test_admin_token_value_is_stored_in_the_secret(chart: helm_python.Chart) -> None:
    """adminToken.value is the token the chart's Secret holds."""
    objects = render(chart, {"adminToken": {"value": "s3cr3t-t0ken"}})
    secret = one(objects, "Secret")
    assert base64.b64decode(secret["data"]["token"]) == b"s3cr3t-t0ken"
    assert token_volume(objects)[1]["secret"]["secretName"] == secret["metadata"]["name"]


def test_existing_secret_is_mounted_and_none_is_created(chart: helm_python.Chart) -> None:
    """adminToken.existingSecret (and its key) is mounted and named by bearer_token_file; the
    chart creates no Secret of its own."""
    values = {"adminToken": {"existingSecret": "soc-api-token", "existingSecretKey": "api"}}
    objects = render(chart, values)
    assert by_kind(objects, "Secret") == []
    mount, volume = token_volume(objects)
    assert volume["secret"]["secretName"] == "soc-api-token"
    config = yaml.safe_load(config_text(objects))
    assert config["http"]["auth"] == {"bearer_token_file": f"{mount['mountPath']}/api"}
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            validate_kubernetes(obj)
    notes = render_files(chart, values)["NOTES.txt"]
    assert "get secret soc-api-token -o jsonpath='{.data.api}' | base64 -d" in notes


def test_own_http_auth_or_disabling_skips_the_chart_token(chart: helm_python.Chart) -> None:
    """A token source in config.http.auth wins (no Secret, no mount, the user's auth kept);
    adminToken.enabled false leaves /api/ open and NOTES.txt warns."""
    own = {"config": {"http": {"auth": {"bearer_token_env": "API_TOKEN"}}}}
    objects = render(chart, {**own, "adminToken": {"enabled": True}})
    assert by_kind(objects, "Secret") == []
    assert "api-token" not in {v["name"] for v in pod_spec(objects)["volumes"]}
    assert yaml.safe_load(config_text(objects))["http"]["auth"] == {"bearer_token_env": "API_TOKEN"}
    values = {"adminToken": {"enabled": False}}
    objects = render(chart, values)
    assert by_kind(objects, "Secret") == []
    assert "auth" not in yaml.safe_load(config_text(objects))["http"]
    notes = render_files(chart, values)["NOTES.txt"]
    assert "WARNING: adminToken.enabled is false" in notes


def test_notes_tell_how_to_read_the_token(chart: helm_python.Chart) -> None:
    """NOTES.txt gives the kubectl command that prints the generated token and a curl call
    of the API with it."""
    notes = render_files(chart)["NOTES.txt"]
    assert (
        f"kubectl -n {NAMESPACE} get secret {FULLNAME}-api-token "
        "-o jsonpath='{.data.token}' | base64 -d"
    ) in notes
    assert '/api/v1/alerts -H "Authorization: Bearer $TOKEN"' in notes
    assert "WARNING" not in notes


# -- the Service ------------------------------------------------------------------------------


def test_service_exposes_otlp_grpc_otlp_http_and_admin_http(default: list[Manifest]) -> None:
    """Port 4317 named grpc with appProtocol grpc, 4318 named otlp-http with appProtocol http,
    8080 named http, each targeting the container port of its name, selecting the pod."""
    service = one(default, "Service")
    ports = service_ports(default)
    assert ports["grpc"]["port"] == 4317
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["otlp-http"]["port"] == 4318
    assert ports["otlp-http"]["appProtocol"] == "http"
    assert ports["http"]["port"] == 8080
    assert {name: p["port"] for name, p in ports.items()} == PORTS
    assert {p["targetPort"] for p in ports.values()} == container_ports(default).keys()
    pod_labels = one(default, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# -- the config -------------------------------------------------------------------------------


def test_default_config_is_valid_for_pathwatch(default: list[Manifest], tmp_path: Path) -> None:
    """The ConfigMap's config.yaml parses as YAML, holds the chart defaults (the admin API on
    every interface, guarded by the mounted token) and passes `pathwatch check-config`."""
    text = config_text(default)
    assert yaml.safe_load(text) == {
        "data_dir": "/var/lib/pathwatch",
        "receiver": {
            "grpc": {"listen": "0.0.0.0:4317"},
            "http": {"listen": "0.0.0.0:4318"},
        },
        "http": {"listen": "0.0.0.0:8080", "auth": {"bearer_token_file": API_TOKEN_FILE}},
    }
    result = check_config(text, tmp_path, files=API_TOKEN)
    assert result.returncode == 0, result.stderr
    assert "config OK: data_dir=/var/lib/pathwatch" in result.stdout


def test_custom_config_merges_over_defaults_and_is_valid(
    custom: list[Manifest], tmp_path: Path
) -> None:
    """A user config with sinks and rules keeps the chart's listen addresses and data dir and
    passes `pathwatch check-config` with the secretEnv variables set."""
    text = config_text(custom)
    config = yaml.safe_load(text)
    assert config["data_dir"] == "/var/lib/pathwatch"
    assert config["receiver"]["grpc"] == {
        "listen": "0.0.0.0:4317",
        "auth": {"bearer_token_env": "PATHWATCH_RECEIVER_TOKEN"},
    }
    assert config["receiver"]["http"] == {"listen": "0.0.0.0:4318"}
    assert config["http"]["listen"] == "0.0.0.0:8080"
    assert config["sinks"] == CUSTOM["config"]["sinks"]
    assert config["store"]["cache_keys"] == 200000
    result = check_config(text, tmp_path, SECRETS, files=API_TOKEN)
    assert result.returncode == 0, result.stderr
    assert "2 sink(s)" in result.stdout


def test_check_config_rejects_a_sink_whose_secret_is_missing(
    custom: list[Manifest], tmp_path: Path
) -> None:
    """Without the Secret-provided variable, pathwatch refuses the webhook sink: the secretEnv
    wiring is what makes the custom config start."""
    secrets = {k: v for k, v in SECRETS.items() if k != "PATHWATCH_WEBHOOK_SECRET"}
    result = check_config(config_text(custom), tmp_path, secrets, files=API_TOKEN)
    assert result.returncode == 2
    assert "PATHWATCH_WEBHOOK_SECRET" in result.stderr


def test_secret_env_becomes_secret_key_refs(custom: list[Manifest]) -> None:
    """Each secretEnv entry is an env var read from its Secret key, and every secret_env /
    token_env / bearer_token_env the config names is provided."""
    env = {e["name"]: e for e in container(custom)["env"]}
    assert env["PATHWATCH_WEBHOOK_SECRET"]["valueFrom"] == {
        "secretKeyRef": {"name": "pathwatch-webhook", "key": "secret"}
    }
    assert env["SPLUNK_HEC_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "splunk-hec", "key": "token"}
    }
    config = yaml.safe_load(config_text(custom))
    named = {s.get("secret_env") or s.get("token_env") for s in config["sinks"]}
    named.add(config["receiver"]["grpc"]["auth"]["bearer_token_env"])
    assert named <= env.keys()


def test_notes_warn_about_a_secret_variable_nobody_provides(chart: helm_python.Chart) -> None:
    """NOTES.txt warns when a variable the config reads a secret from is not set by secretEnv
    or extraEnv."""
    values = copy.deepcopy(CUSTOM)
    values["secretEnv"] = values["secretEnv"][1:2]
    notes = render_files(chart, values)["NOTES.txt"]
    assert "sink soc secret_env names PATHWATCH_WEBHOOK_SECRET" in notes
    assert "receiver.grpc.auth bearer_token_env names PATHWATCH_RECEIVER_TOKEN" in notes
    assert "sink splunk" not in notes
    assert "WARNING" not in render_files(chart, CUSTOM)["NOTES.txt"]
    values = {"config": {"receiver": {"http": {"auth": {"bearer_token_env": "OTLP_HTTP_TOKEN"}}}}}
    notes = render_files(chart, values)["NOTES.txt"]
    assert "receiver.http.auth bearer_token_env names OTLP_HTTP_TOKEN" in notes


def test_notes_give_both_otlp_endpoints(chart: helm_python.Chart) -> None:
    """NOTES.txt tells collectors where to send: the gRPC address and the OTLP/HTTP URL."""
    notes = render_files(chart)["NOTES.txt"]
    assert f"{FULLNAME}.{NAMESPACE}.svc:4317" in notes
    assert f"http://{FULLNAME}.{NAMESPACE}.svc:4318" in notes


def test_checksum_annotation_tracks_the_config(
    chart: helm_python.Chart, default: list[Manifest], custom: list[Manifest]
) -> None:
    """The pod's checksum/config is the SHA-256 of config.yaml: it changes (rolling the pod)
    when the config changes and only then."""
    text = config_text(default)
    assert checksum(default) == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()
    assert checksum(custom) != checksum(default)
    debug = render(chart, {"config": {"log": {"level": "debug"}}})
    assert checksum(debug) not in (checksum(default), checksum(custom))
    other = render(chart, {"resources": {"limits": {"memory": "2Gi"}}, "podLabels": {"a": "b"}})
    assert checksum(other) == checksum(default)


# -- persistence ------------------------------------------------------------------------------


def test_existing_claim_is_mounted_and_no_pvc_created(custom: list[Manifest]) -> None:
    """persistence.existingClaim mounts that claim and the chart creates none."""
    assert by_kind(custom, "PersistentVolumeClaim") == []
    volumes = {v["name"]: v for v in pod_spec(custom)["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "pathwatch-data"}


def test_storage_class_settings(chart: helm_python.Chart) -> None:
    """storageClass names the class; "-" requests no dynamic provisioning."""
    fast = one(render(chart, {"persistence": {"storageClass": "fast"}}), "PersistentVolumeClaim")
    assert fast["spec"]["storageClassName"] == "fast"
    static = one(render(chart, {"persistence": {"storageClass": "-"}}), "PersistentVolumeClaim")
    assert static["spec"]["storageClassName"] == ""


def test_without_persistence_the_data_dir_is_ephemeral_and_notes_warn(
    chart: helm_python.Chart,
) -> None:
    """persistence.enabled=false uses an emptyDir and NOTES.txt warns that restarts lose the
    baseline."""
    values = {"persistence": {"enabled": False}}
    objects = render(chart, values)
    assert by_kind(objects, "PersistentVolumeClaim") == []
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert "persistence is disabled" in render_files(chart, values)["NOTES.txt"]


# -- values.schema.json -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"replicaCount": 2}, "/replicaCount"),
        ({"persistence": {"size": 5}}, "/persistence/size"),
        ({"persistence": {"size": "ten gigs"}}, "/persistence/size"),
        ({"config": {"data_dir": "/data"}}, "/config/data_dir"),
        ({"config": {"sink": []}}, "/config"),
        ({"secretEnv": [{"name": "X", "secretName": "s"}]}, "/secretEnv/0"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"service": {"ports": {"otlpHttp": "4318"}}}, "/service/ports/otlpHttp"),
        ({"service": {"ports": {"otlpHttp": 70000}}}, "/service/ports/otlpHttp"),
        ({"service": {"ports": {"otlp_http": 4318}}}, "otlp_http"),
        ({"servicemonitor": {"enabled": True}}, "servicemonitor"),
        ({"adminToken": {"value": "two words"}}, "/adminToken/value"),
        ({"adminToken": {"existingSecret": "Not_A_Name"}}, "/adminToken/existingSecret"),
        ({"networkPolicy": {"collectors": {"namespace": "Agents"}}}, "/networkPolicy/collectors"),
        ({"networkPolicy": {"prometheus": {"enabled": "yes"}}}, "/networkPolicy/prometheus"),
        # An empty peer admits every source.
        ({"networkPolicy": {"ingress": {"grpcFrom": [{}]}}}, "/networkPolicy/ingress/grpcFrom/0"),
        ({"grafanaDashboard": {"enabled": "yes"}}, "/grafanaDashboard/enabled"),
        ({"grafanaDashboard": {"label": "grafana dashboard"}}, "/grafanaDashboard/label"),
        ({"grafanaDashboard": {"labelValue": 1}}, "/grafanaDashboard/labelValue"),
        ({"grafanaDashboard": {"namespace": "Monitoring"}}, "/grafanaDashboard/namespace"),
        ({"grafanaDashboard": {"folder": "Security"}}, "folder"),
    ],
)
def test_schema_rejects_bad_values(
    chart: helm_python.Chart, values: dict[str, Any], where: str
) -> None:
    """values.schema.json refuses wrong types and typos, naming the key, before anything
    renders."""
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chart.validate_schema(values)
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_accepts_the_defaults_and_a_full_configuration(chart: helm_python.Chart) -> None:
    """The chart's own values and the all-features values validate."""
    chart.validate_schema(None)
    chart.validate_schema(CUSTOM)


def test_default_ports_are_pathwatch_default_listen_ports() -> None:
    """The ports the chart (and the image, and deploy/pathwatch.yaml) expose are the ports of
    pathwatch's embedded default listen addresses."""
    config = Config()
    defaults = {
        "grpc": listen_port(config.receiver.grpc.listen),
        "otlp-http": listen_port(config.receiver.http.listen),
        "http": listen_port(config.http.listen),
    }
    assert defaults == PORTS
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["service"]["ports"] == {
        "grpc": PORTS["grpc"],
        "otlpHttp": PORTS["otlp-http"],
        "http": PORTS["http"],
    }


def test_schema_config_keys_match_pathwatch_config() -> None:
    """The schema's config keys are exactly pathwatch's top-level settings, so a new setting
    is not refused and a typo is."""
    schema = helm_python.Chart.load(CHART).schema
    assert schema is not None
    keys = set(schema["properties"]["config"]["properties"])
    assert keys == {f.name for f in dataclasses.fields(Config)}


# -- Prometheus Operator objects --------------------------------------------------------------


def test_service_monitor_scrapes_metrics_on_the_http_port(custom: list[Manifest]) -> None:
    """The ServiceMonitor selects the pathwatch Service and scrapes /metrics on its http port,
    carrying the labels Prometheus selects on."""
    monitor = one(custom, "ServiceMonitor")
    service = one(custom, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    assert "http" in {p["name"] for p in service["spec"]["ports"]}


def prometheus_rules(objects: list[Manifest]) -> list[dict[str, Any]]:
    (group,) = one(objects, "PrometheusRule")["spec"]["groups"]
    rules: list[dict[str, Any]] = group["rules"]
    return rules


def test_prometheus_rule_has_the_operational_alerts(custom: list[Manifest]) -> None:
    """Eight alerts, each on this release's series, with a severity, a summary and a
    description, and the configured extra labels."""
    rules = {r["alert"]: r for r in prometheus_rules(custom)}
    assert rules.keys() == ALERTS.keys()
    for name, start in ALERTS.items():
        rule = rules[name]
        assert rule["expr"].startswith(start), name
        assert SELECTOR in rule["expr"], name
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["labels"]["team"] == "secops"
        assert len(rule["annotations"]["summary"]) > 20
        assert len(rule["annotations"]["description"]) > 80
    assert "> 900" in rules["PathwatchOutboxBacklog"]["expr"]
    assert "> 7200" in rules["PathwatchEvaluationStale"]["expr"]
    assert "== 1" in rules["PathwatchSinkDisabled"]["expr"]
    assert "[15m]) > 0" in rules["PathwatchDeliveryFailing"]["expr"]
    assert "[10m]) > 0" in rules["PathwatchStoreWriteErrors"]["expr"]
    assert "[5m]) > 0" in rules["PathwatchIngestRejecting"]["expr"]


def test_alerts_use_only_metrics_and_labels_pathwatch_exports(custom: list[Manifest]) -> None:
    """Every metric an alert reads is in pathwatch's metric catalogue, and every $labels.X its
    annotations print is a label of that metric (no "<no value>" in a page)."""
    catalogue = {spec.name: set(spec.labels) for spec in Metrics().specs}
    for rule in prometheus_rules(custom):
        metrics = set(re.findall(r"\bpathwatch_[a-z_]+", rule["expr"]))
        assert metrics and metrics <= catalogue.keys(), rule["alert"]
        labels = set().union(*(catalogue[m] for m in metrics))
        for text in rule["annotations"].values():
            assert set(re.findall(r"\$labels\.(\w+)", text)) <= labels, rule["alert"]


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    return found


def write_rule_file(custom: list[Manifest], path: Path, annotations: bool = True) -> None:
    rules = copy.deepcopy(prometheus_rules(custom))
    if not annotations:
        for rule in rules:
            rule.pop("annotations")
    path.write_text(yaml.safe_dump({"groups": [{"name": "pathwatch", "rules": rules}]}))


def test_prometheus_rules_pass_promtool(custom: list[Manifest], tmp_path: Path) -> None:
    """promtool accepts the rule group: PromQL and annotation templates parse."""
    write_rule_file(custom, tmp_path / "rules.yaml")
    result = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "rules.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    all_labels = {"job": FULLNAME, "namespace": NAMESPACE, **labels}
    text = ", ".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def fired(**labels: str) -> dict[str, Any]:
    return {"exp_labels": {"job": FULLNAME, "namespace": NAMESPACE, "team": "secops", **labels}}


def test_alerts_fire_on_their_conditions(custom: list[Manifest], tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert fires on the condition it describes, after its
    `for`, and ignores healthy series and other jobs' series."""
    write_rule_file(custom, tmp_path / "rules.yaml", annotations=False)
    soc = {"sink": "soc"}
    other_job = {"job": "another-service"}
    unit = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    series("pathwatch_deliveries_total", "0+1x60", outcome="failed", **soc),
                    series("pathwatch_deliveries_total", "0+9x60", outcome="delivered", **soc),
                    series("pathwatch_deadletters", "0 0 3x60", **soc),
                    series("pathwatch_deadletters", "0x60", sink="ok"),
                    series("pathwatch_sink_disabled", "1x60", **soc),
                    series("pathwatch_sink_disabled", "1x60", sink="x", **other_job),
                    series("pathwatch_outbox_oldest_age_seconds", "1000x60", **soc),
                    series("pathwatch_outbox_oldest_age_seconds", "30x60", sink="ok"),
                    series("pathwatch_store_write_errors_total", "0 0 0 1x60"),
                    series("pathwatch_export_requests_total", "0+5x60", outcome="unavailable"),
                    series("pathwatch_export_requests_total", "0+50x60", outcome="ok"),
                    series("pathwatch_key_limit_hits_total", "0 0 0 1x60", scope="host"),
                    series("pathwatch_key_limit_hits_total", "0x60", scope="fleet"),
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "30m",
                        "alertname": "PathwatchDeliveryFailing",
                        "exp_alerts": [fired(severity="warning", outcome="failed", **soc)],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "PathwatchDeadLetters",
                        "exp_alerts": [fired(severity="warning", **soc)],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "PathwatchSinkDisabled",
                        "exp_alerts": [fired(severity="critical", **soc)],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "PathwatchOutboxBacklog",
                        "exp_alerts": [fired(severity="warning", **soc)],
                    },
                    {
                        "eval_time": "5m",
                        "alertname": "PathwatchStoreWriteErrors",
                        "exp_alerts": [fired(severity="critical")],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "PathwatchIngestRejecting",
                        "exp_alerts": [fired(severity="warning", outcome="unavailable")],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "PathwatchKeyLimitReached",
                        "exp_alerts": [fired(severity="warning", scope="host")],
                    },
                    # Not yet: the condition holds, but not for 10 minutes.
                    {"eval_time": "8m", "alertname": "PathwatchIngestRejecting", "exp_alerts": []},
                ],
            },
            {
                # Two rules: one ticks every hour (its last tick keeps up with time()), the other
                # stopped at t=0, so it is stale after 2 h and fires 10 min later.
                "interval": "1m",
                "input_series": [
                    series("pathwatch_last_tick_timestamp_seconds", "0+60x200", rule="healthy"),
                    series("pathwatch_last_tick_timestamp_seconds", "0x200", rule="stuck"),
                ],
                "alert_rule_test": [
                    {"eval_time": "2h", "alertname": "PathwatchEvaluationStale", "exp_alerts": []},
                    {
                        "eval_time": "2h15m",
                        "alertname": "PathwatchEvaluationStale",
                        "exp_alerts": [fired(severity="critical", rule="stuck")],
                    },
                ],
            },
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit))
    result = subprocess.run(
        [promtool(), "test", "rules", str(tmp_path / "test.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- NetworkPolicy ----------------------------------------------------------------------------


def namespace_named(name: str) -> dict[str, Any]:
    """The namespaceSelector that matches exactly the namespace `name`."""
    return {"matchLabels": {"kubernetes.io/metadata.name": name}}


def peers_by_port(policy: Manifest) -> dict[str, list[dict[str, Any]]]:
    """Port name -> the peers its ingress rule admits. A rule without `from` would admit every
    source: fail on it."""
    peers: dict[str, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), f"ingress rule {rule} admits every source"
        for port in rule["ports"]:
            peers[port["port"]] = rule["from"]
    return peers


def assert_namespace_and_label(peer: dict[str, Any]) -> None:
    """`peer` selects by one namespace's name AND by pod labels in the same entry."""
    (name,) = peer["namespaceSelector"]["matchLabels"].values()
    assert peer["namespaceSelector"] == namespace_named(name), peer
    assert peer["podSelector"]["matchLabels"], peer


def test_default_network_policy_admits_by_namespace_and_label(default: list[Manifest]) -> None:
    """The policy is on by default. OTLP (grpc, otlp-http) is admitted only from pods labelled
    as the agent DaemonSet's in namespace pathwatch-agent, the admin port only from Prometheus
    pods in namespace monitoring; no peer is a bare `namespaceSelector: {}` (every namespace)."""
    policy = one(default, "NetworkPolicy")
    validate_kubernetes(policy)
    pod_labels = one(default, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    peers = peers_by_port(policy)
    assert peers.keys() == {"grpc", "otlp-http", "http"}
    for port_peers in peers.values():
        for peer in port_peers:
            assert peer.get("namespaceSelector") != {}, peer
            assert_namespace_and_label(peer)
    agent = yaml.safe_load_all((DEPLOY / "collector" / "daemonset.yaml").read_text())
    daemonset = next(d for d in agent if d["kind"] == "DaemonSet")
    agent_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert peers["otlp-http"] == peers["grpc"]
    (collectors,) = peers["grpc"]
    assert collectors["namespaceSelector"] == namespace_named("pathwatch-agent")
    assert collectors["podSelector"]["matchLabels"].items() <= agent_labels.items()
    (prometheus,) = peers["http"]
    assert prometheus == {
        "namespaceSelector": namespace_named("monitoring"),
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }


def test_network_policy_peers_follow_the_values(chart: helm_python.Chart) -> None:
    """collectors.namespace "" means the release namespace; namespaces and labels of the
    collectors and Prometheus are values (null drops a default label); operators.namespace adds
    a peer for that namespace's pods; with Prometheus off and no operators the admin port gets
    no rule at all (never a rule without `from`, which would admit everyone)."""
    values = {
        "networkPolicy": {
            "collectors": {
                "namespace": "",
                "podLabels": {"app.kubernetes.io/name": "otel-agent"},
            },
            # Helm merges maps with the defaults: null drops a default label.
            "prometheus": {
                "namespace": "observability",
                "podLabels": {"app.kubernetes.io/name": None, "app": "prom"},
            },
            "operators": {"namespace": "secops"},
        }
    }
    policy = one(render(chart, values), "NetworkPolicy")
    validate_kubernetes(policy)
    peers = peers_by_port(policy)
    assert peers["grpc"] == [
        {
            "namespaceSelector": namespace_named(NAMESPACE),
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "otel-agent"}},
        }
    ]
    assert peers["http"] == [
        {
            "namespaceSelector": namespace_named("observability"),
            "podSelector": {"matchLabels": {"app": "prom"}},
        },
        {"namespaceSelector": namespace_named("secops"), "podSelector": {}},
    ]
    closed = {"networkPolicy": {"prometheus": {"enabled": False}}}
    policy = one(render(chart, closed), "NetworkPolicy")
    validate_kubernetes(policy)
    assert peers_by_port(policy).keys() == {"grpc", "otlp-http"}
    notes = render_files(chart, closed)["NOTES.txt"]
    assert "admin port from: no pod" in notes


def test_network_policy_peers_can_be_replaced(chart: helm_python.Chart) -> None:
    """ingress.grpcFrom and ingress.httpFrom replace the derived peers entirely (for a
    collector deployed differently, or an ipBlock)."""
    grpc_from = [
        {
            "namespaceSelector": namespace_named("otel"),
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "opentelemetry-collector"}},
        }
    ]
    http_from = [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    values = {"networkPolicy": {"ingress": {"grpcFrom": grpc_from, "httpFrom": http_from}}}
    policy = one(render(chart, values), "NetworkPolicy")
    validate_kubernetes(policy)
    peers = peers_by_port(policy)
    assert peers["grpc"] == peers["otlp-http"] == grpc_from
    assert peers["http"] == http_from
    notes = render_files(chart, values)["NOTES.txt"]
    assert "networkPolicy.ingress.grpcFrom" in notes


def test_disabling_the_network_policy_is_warned_about(chart: helm_python.Chart) -> None:
    """networkPolicy.enabled false renders no policy, and NOTES.txt says what that exposes."""
    values = {"networkPolicy": {"enabled": False}}
    assert by_kind(render(chart, values), "NetworkPolicy") == []
    notes = render_files(chart, values)["NOTES.txt"]
    assert "WARNING: networkPolicy.enabled is false" in notes
    assert "networkPolicy.enabled is false" not in render_files(chart)["NOTES.txt"]


def test_network_policy_admits_collectors_and_prometheus_only(custom: list[Manifest]) -> None:
    """OTLP (grpc and otlp-http) only from the collector agent's pods, admin HTTP only from
    Prometheus, egress only to DNS and the configured sinks."""
    policy = one(custom, "NetworkPolicy")
    spec = policy["spec"]
    pod_labels = one(custom, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    ingress = {p["port"]: rule["from"] for rule in spec["ingress"] for p in rule["ports"]}
    assert ingress.keys() == {"grpc", "otlp-http", "http"}
    assert ingress["otlp-http"] == ingress["grpc"]
    assert {p["protocol"] for rule in spec["ingress"] for p in rule["ports"]} == {"TCP"}
    agent = yaml.safe_load_all((DEPLOY / "collector" / "daemonset.yaml").read_text())
    daemonset = next(d for d in agent if d["kind"] == "DaemonSet")
    agent_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    (collectors,) = ingress["grpc"]
    assert collectors["podSelector"]["matchLabels"].items() <= agent_labels.items()
    assert collectors["namespaceSelector"] == namespace_named("pathwatch-agent")
    (prometheus,) = ingress["http"]
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert prometheus["namespaceSelector"] == namespace_named("monitoring")
    dns, sinks = spec["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert sinks == CUSTOM["networkPolicy"]["egress"]["rules"][0]


def test_network_policy_leaves_egress_open_unless_asked(chart: helm_python.Chart) -> None:
    """With egress.enabled false the policy restricts ingress only, so sinks stay reachable."""
    policy = one(render(chart, {"networkPolicy": {"enabled": True}}), "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert "egress" not in policy["spec"]


# -- the Grafana dashboard ----------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "pathwatch-dashboard.json"
DASHBOARD_KEY = "pathwatch-dashboard.json"


def dashboard_map(objects: list[Manifest]) -> Manifest:
    (found,) = [o for o in by_kind(objects, "ConfigMap") if DASHBOARD_KEY in o["data"]]
    return found


def test_chart_copy_of_the_dashboard_is_the_deploy_file() -> None:
    """The chart embeds files/pathwatch-dashboard.json, a copy of the canonical
    deploy/grafana/pathwatch-dashboard.json (a chart cannot read outside its directory): the
    two must be byte for byte the same. After editing the dashboard, copy it over."""
    copy_ = CHART / "files" / DASHBOARD_KEY
    assert copy_.read_bytes() == DASHBOARD.read_bytes(), f"cp {DASHBOARD} {copy_}"


def test_dashboard_config_map_carries_the_dashboard_for_the_sidecar(
    default: list[Manifest],
) -> None:
    """By default a ConfigMap labelled grafana_dashboard: "1" (what Grafana's sidecar watches)
    in the release's namespace holds the dashboard JSON, which parses and equals
    deploy/grafana/pathwatch-dashboard.json."""
    cm = dashboard_map(default)
    assert cm["metadata"]["name"] == f"{FULLNAME}-dashboard"
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert list(cm["data"]) == [DASHBOARD_KEY]
    dashboard = json.loads(cm["data"][DASHBOARD_KEY])
    assert dashboard == json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "pathwatch" and dashboard["panels"]
    # kubectl apply keeps the whole object in an annotation (at most 256 KiB).
    assert len(yaml.safe_dump(cm)) < 200_000


def test_dashboard_label_namespace_and_annotations_follow_the_values(
    chart: helm_python.Chart,
) -> None:
    """The sidecar's label and value, the namespace it searches and a folder annotation are
    configurable."""
    values = {
        "grafanaDashboard": {
            "label": "example.com/dashboard",
            "labelValue": "pathwatch",
            "namespace": "monitoring",
            "annotations": {"grafana_folder": "Security"},
        }
    }
    cm = dashboard_map(render(chart, values))
    assert cm["metadata"]["labels"]["example.com/dashboard"] == "pathwatch"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Security"}
    validate_kubernetes(cm)
    numeric = dashboard_map(render(chart, {"grafanaDashboard": {"label": "1", "labelValue": ""}}))
    assert numeric["metadata"]["labels"]["1"] == ""
    validate_kubernetes(numeric)


def test_dashboard_can_be_switched_off(chart: helm_python.Chart) -> None:
    """grafanaDashboard.enabled=false renders no dashboard ConfigMap; pathwatch's own config
    ConfigMap stays."""
    objects = render(chart, {"grafanaDashboard": {"enabled": False}})
    assert [o["metadata"]["name"] for o in by_kind(objects, "ConfigMap")] == [FULLNAME]
    assert config_map(objects)["metadata"]["name"] == FULLNAME
