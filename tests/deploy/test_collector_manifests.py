"""The collector agent (deploy/collector/) and the plain manifests (deploy/pathwatch.yaml)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms

from pathwatch.config.model import GrpcReceiverConfig
from tests.deploy.support import (
    API_TOKEN,
    API_TOKEN_FILE,
    CHART,
    DEPLOY,
    PORTS,
    Manifest,
    by_kind,
    check_config,
    listen_port,
    load_manifests,
    one,
    validate_kubernetes,
)
from tests.support import FIXTURES

AGENT_CONFIG = DEPLOY / "collector" / "agent-config.yaml"
DAEMONSET = DEPLOY / "collector" / "daemonset.yaml"
PATHWATCH = DEPLOY / "pathwatch.yaml"

MUTE_FLAGS = (
    "mute_process_name_error",
    "mute_process_exe_error",
    "mute_process_io_error",
    "mute_process_user_error",
    "mute_process_cgroup_error",
)


@pytest.fixture(scope="module")
def agent() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(AGENT_CONFIG.read_text(encoding="utf-8"))
    return config


@pytest.fixture(scope="module")
def agent_objects() -> list[Manifest]:
    return load_manifests(DAEMONSET.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pathwatch_objects() -> list[Manifest]:
    return load_manifests(PATHWATCH.read_text(encoding="utf-8"))


def agent_container(agent_objects: list[Manifest]) -> dict[str, Any]:
    (c,) = one(agent_objects, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    return dict(c)


def otlp_exporter(agent: dict[str, Any]) -> dict[str, Any]:
    (name,) = agent["service"]["pipelines"]["metrics"]["exporters"]
    exporter: dict[str, Any] = agent["exporters"][name]
    return exporter


# -- every manifest ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [DAEMONSET, PATHWATCH], ids=lambda p: p.name)
def test_manifests_are_valid_and_namespace_agnostic(path: Path) -> None:
    """Every object passes the Kubernetes API schema strictly and names no namespace, so
    `kubectl apply -n <ns>` places it."""
    objects = load_manifests(path.read_text(encoding="utf-8"))
    assert objects
    for obj in objects:
        validate_kubernetes(obj)
        assert "namespace" not in obj["metadata"], obj["kind"]


# -- agent configuration ----------------------------------------------------------------------


def test_agent_scrapes_every_process_through_hostfs(agent: dict[str, Any]) -> None:
    """hostmetrics reads the host's /proc under /hostfs every 60 s, with the process scraper's
    noisy per-process errors muted and the utilization metrics enabled."""
    hostmetrics = agent["receivers"]["hostmetrics"]
    assert hostmetrics["root_path"] == "/hostfs"
    assert hostmetrics["collection_interval"] == "60s"
    process = hostmetrics["scrapers"]["process"]
    assert {flag: process[flag] for flag in MUTE_FLAGS} == dict.fromkeys(MUTE_FLAGS, True)
    assert process["metrics"] == {
        "process.memory.utilization": {"enabled": True},
        "process.cpu.utilization": {"enabled": True},
    }


def test_agent_adds_the_key_attributes_pathwatch_needs(agent: dict[str, Any]) -> None:
    """host.name and k8s.node.name come from K8S_NODE_NAME, k8s.cluster.name from a set value,
    all upserted."""
    attributes = {a["key"]: a for a in agent["processors"]["resource"]["attributes"]}
    assert attributes.keys() == {"host.name", "k8s.node.name", "k8s.cluster.name"}
    for key in ("host.name", "k8s.node.name"):
        assert attributes[key]["value"] == "${env:K8S_NODE_NAME}"
    assert attributes["k8s.cluster.name"]["value"]
    assert "${" not in attributes["k8s.cluster.name"]["value"]
    assert {a["action"] for a in attributes.values()} == {"upsert"}


def test_agent_pipeline_limits_memory_first_and_batches_last(agent: dict[str, Any]) -> None:
    """The metrics pipeline runs memory_limiter, resource, batch in that order, and every
    component it names is configured."""
    pipeline = agent["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["hostmetrics"]
    assert pipeline["processors"] == ["memory_limiter", "resource", "batch"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= agent[kind].keys()
    assert set(agent["service"]["extensions"]) <= agent["extensions"].keys()
    limiter = agent["processors"]["memory_limiter"]
    assert 0 < limiter["spike_limit_percentage"] < limiter["limit_percentage"] <= 90


def test_otlp_exporter_reaches_pathwatch_reliably(
    agent: dict[str, Any], pathwatch_objects: list[Manifest]
) -> None:
    """The otlp exporter dials pathwatch's Service on its grpc port, in plaintext, gzip
    compressed, with a sending queue and retries, and a timeout longer than pathwatch's ack
    timeout."""
    (name,) = agent["service"]["pipelines"]["metrics"]["exporters"]
    assert name.split("/")[0] in ("otlp", "otlp_grpc")
    exporter = otlp_exporter(agent)
    host, port = exporter["endpoint"].rsplit(":", 1)
    service = one(pathwatch_objects, "Service")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert re.fullmatch(rf"{service['metadata']['name']}\.[a-z0-9-]+\.svc", host)
    assert int(port) == grpc_port
    assert exporter["tls"] == {"insecure": True}
    assert exporter["compression"] == "gzip"
    assert exporter["sending_queue"]["enabled"] is True
    assert exporter["sending_queue"]["queue_size"] > 0
    assert exporter["retry_on_failure"]["enabled"] is True
    timeout = int(exporter["timeout"].removesuffix("s"))
    assert timeout > GrpcReceiverConfig().ack_timeout


def test_a_full_batch_stays_well_below_pathwatch_message_limit(agent: dict[str, Any]) -> None:
    """A batch at send_batch_max_size, built from the collector's real process output with 4 KiB
    command lines, is under a quarter of pathwatch's 64 MiB receive limit."""
    batch = agent["processors"]["batch"]
    assert 0 < batch["send_batch_size"] <= batch["send_batch_max_size"]
    data = yaml.safe_load((FIXTURES / "otelcol-contrib" / "expected_process.yaml").read_text())
    request = ms.ExportMetricsServiceRequest()
    json_format.ParseDict(data, request)
    points = 0
    for rm in request.resource_metrics:
        for attr in rm.resource.attributes:
            if attr.key == "process.command_line":
                attr.value.string_value = "x" * 4096
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points += len(getattr(metric, metric.WhichOneof("data")).data_points)
    full_batch = request.ByteSize() / points * batch["send_batch_max_size"]
    limit = GrpcReceiverConfig().max_receive_message_size
    assert limit == 64 << 20, "agent-config.yaml's comment quotes 64 MiB"
    assert "64 MiB" in AGENT_CONFIG.read_text(encoding="utf-8")
    assert full_batch < limit / 4


# -- the DaemonSet ----------------------------------------------------------------------------


def test_daemonset_runs_the_agent_config(
    agent: dict[str, Any], agent_objects: list[Manifest]
) -> None:
    """The ConfigMap carries the same config as agent-config.yaml, mounted where --config
    points."""
    configmap = one(agent_objects, "ConfigMap")
    ((key, text),) = configmap["data"].items()
    assert yaml.safe_load(text) == agent
    c = agent_container(agent_objects)
    spec = one(agent_objects, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mount = next(
        m for m in c["volumeMounts"] if volumes[m["name"]].get("configMap", {}).get("name")
    )
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert c["args"] == [f"--config={mount['mountPath']}/{key}"]
    assert re.fullmatch(r"otel/opentelemetry-collector-contrib:\d+\.\d+\.\d+", c["image"])


def test_daemonset_sees_every_host_process(agent_objects: list[Manifest]) -> None:
    """hostPID, the host's / read-only at /hostfs with HostToContainer propagation, the node
    name from the downward API, and scheduling on control-plane nodes too."""
    spec = one(agent_objects, "DaemonSet")["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    assert not spec.get("hostNetwork", False)
    volumes = {v["name"]: v for v in spec["volumes"]}
    c = agent_container(agent_objects)
    (hostfs,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/hostfs"]
    assert volumes[hostfs["name"]]["hostPath"]["path"] == "/"
    assert hostfs["readOnly"] is True
    assert hostfs["mountPropagation"] == "HostToContainer"
    env = {e["name"]: e for e in c["env"]}
    assert env["K8S_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    tolerated = {t["key"] for t in spec["tolerations"]}
    assert "node-role.kubernetes.io/control-plane" in tolerated


def test_daemonset_runs_as_root_with_only_two_capabilities(agent_objects: list[Manifest]) -> None:
    """uid 0 with every capability dropped but SYS_PTRACE and DAC_READ_SEARCH, a read-only root
    filesystem, no privilege escalation, not privileged."""
    sc = agent_container(agent_objects)["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["DAC_READ_SEARCH", "SYS_PTRACE"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_daemonset_has_resources_for_the_memory_limiter(agent_objects: list[Manifest]) -> None:
    """Requests and a memory limit: memory_limiter's percentages are of that limit."""
    resources = agent_container(agent_objects)["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_agent_needs_no_kubernetes_api_access(agent_objects: list[Manifest]) -> None:
    """No Role, ClusterRole or binding, and no service account token in the pod."""
    kinds = {o["kind"] for o in agent_objects}
    assert kinds == {"ServiceAccount", "ConfigMap", "DaemonSet"}
    assert one(agent_objects, "ServiceAccount")["automountServiceAccountToken"] is False
    spec = one(agent_objects, "DaemonSet")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == one(agent_objects, "ServiceAccount")["metadata"]["name"]


def test_every_variable_the_config_reads_is_set(
    agent: dict[str, Any], agent_objects: list[Manifest]
) -> None:
    """Each ${env:NAME} in the agent config is an env var of the container."""
    used = set(re.findall(r"\$\{env:(\w+)\}", yaml.safe_dump(agent)))  # values, not comments
    assert used >= {"K8S_NODE_NAME"}
    assert used <= {e["name"] for e in agent_container(agent_objects)["env"]}


# -- deploy/pathwatch.yaml --------------------------------------------------------------------


def test_plain_manifests_config_is_valid_for_pathwatch(
    pathwatch_objects: list[Manifest], tmp_path: Path
) -> None:
    """The ConfigMap's config.yaml passes `pathwatch check-config`."""
    text = one(pathwatch_objects, "ConfigMap")["data"]["config.yaml"]
    result = check_config(text, tmp_path, files=API_TOKEN)
    assert result.returncode == 0, result.stderr
    assert "data_dir=/var/lib/pathwatch" in result.stdout


def test_plain_manifests_expose_otlp_grpc_otlp_http_and_admin_http(
    pathwatch_objects: list[Manifest],
) -> None:
    """The Service has 4317 (grpc), 4318 (otlp-http, appProtocol http) and 8080 (http), each
    targeting the container port of its name, which is the port of its listen address in
    config.yaml."""
    service = {p["name"]: p for p in one(pathwatch_objects, "Service")["spec"]["ports"]}
    assert {name: p["port"] for name, p in service.items()} == PORTS
    assert service["otlp-http"]["port"] == 4318
    assert service["otlp-http"]["appProtocol"] == "http"
    (c,) = one(pathwatch_objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {p["targetPort"] for p in service.values()} == container_ports.keys()
    config = yaml.safe_load(one(pathwatch_objects, "ConfigMap")["data"]["config.yaml"])
    assert container_ports == {
        "grpc": listen_port(config["receiver"]["grpc"]["listen"]),
        "otlp-http": listen_port(config["receiver"]["http"]["listen"]),
        "http": listen_port(config["http"]["listen"]),
    }


def strip_helm(obj: Manifest) -> Manifest:
    """The object without what only Helm adds: labels, annotations, the service account."""
    obj = yaml.safe_load(yaml.safe_dump(obj))
    obj["metadata"] = {"name": obj["metadata"]["name"]}
    template = obj.get("spec", {}).get("template")
    if template:
        template["metadata"] = {}
        template["spec"].pop("serviceAccountName", None)
    return obj


def test_plain_manifests_match_the_chart_defaults(pathwatch_objects: list[Manifest]) -> None:
    """deploy/pathwatch.yaml is what the chart renders by default for release "pathwatch"
    (apart from Helm's labels, checksum and ServiceAccount)."""
    chart = helm_python.Chart.load(CHART)
    # The Grafana dashboard ConfigMap is chart-only: plain manifests ship deploy/grafana/.
    files = chart.render(
        {"grafanaDashboard": {"enabled": False}},
        name="pathwatch",
        namespace="pathwatch",
        is_install=True,
    )
    rendered = [o for name, t in files.items() if name.endswith(".yaml") for o in load_manifests(t)]
    for kind in ("ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy"):
        plain = strip_helm(one(pathwatch_objects, kind))
        chart_obj = strip_helm(one(rendered, kind))
        chart_obj["metadata"].pop("namespace", None)
        assert plain == chart_obj, kind
    assert by_kind(pathwatch_objects, "ServiceAccount") == []
    # The chart generates the token Secret; the plain manifests leave it to a command.
    assert by_kind(pathwatch_objects, "Secret") == []
    assert one(rendered, "Secret")["metadata"]["name"] == "pathwatch-api-token"
    deployment = one(pathwatch_objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one(pathwatch_objects, "Service")["spec"]["selector"].items() <= pod_labels.items()


def test_plain_manifests_admit_collectors_and_prometheus_by_namespace_and_label(
    pathwatch_objects: list[Manifest], agent_objects: list[Manifest]
) -> None:
    """deploy/pathwatch.yaml has a valid NetworkPolicy selecting the pathwatch pod: OTLP only
    from the agent DaemonSet's pods in namespace pathwatch-agent, the admin port only from
    Prometheus pods in namespace monitoring, each peer by namespace AND label."""
    policy = one(pathwatch_objects, "NetworkPolicy")
    validate_kubernetes(policy)
    pod_labels = one(pathwatch_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    peers: dict[str, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits everyone"
        for port in rule["ports"]:
            peers[port["port"]] = rule["from"]
    assert peers.keys() == {"grpc", "otlp-http", "http"}
    agent_labels = one(agent_objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    (collectors,) = peers["grpc"]
    assert peers["otlp-http"] == peers["grpc"]
    assert collectors["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "pathwatch-agent"}
    }
    assert collectors["podSelector"]["matchLabels"]
    assert collectors["podSelector"]["matchLabels"].items() <= agent_labels.items()
    (prometheus,) = peers["http"]
    assert prometheus == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    # The agent's header tells to apply it into the namespace the policy admits.
    assert "kubectl apply -n pathwatch-agent" in DAEMONSET.read_text(encoding="utf-8")


def test_plain_manifests_guard_the_api_with_a_token_from_a_secret(
    pathwatch_objects: list[Manifest], tmp_path: Path
) -> None:
    """config.yaml binds the admin API to every interface with http.auth.bearer_token_file
    naming the key of Secret pathwatch-api-token mounted read-only; the file's header gives the
    command that creates the Secret with a random token and the one that reads it back."""
    config = yaml.safe_load(one(pathwatch_objects, "ConfigMap")["data"]["config.yaml"])
    assert config["http"] == {
        "listen": "0.0.0.0:8080",
        "auth": {"bearer_token_file": API_TOKEN_FILE},
    }
    assert "protect_probes" not in config["http"]
    pod = one(pathwatch_objects, "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    directory, _, key = API_TOKEN_FILE.rpartition("/")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == directory]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "pathwatch-api-token"
    assert volume["secret"]["items"] == [{"key": key, "path": key}]
    assert {c[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")} == {
        "/healthz",
        "/readyz",
    }
    header = PATHWATCH.read_text(encoding="utf-8").split("\napiVersion:", 1)[0]
    assert "create secret generic pathwatch-api-token" in header
    assert '--from-literal=token="$(head -c 32 /dev/urandom' in header
    assert "get secret pathwatch-api-token -o jsonpath='{.data.token}' | base64 -d" in header
    result = check_config(yaml.safe_dump(config), tmp_path, files=API_TOKEN)
    assert result.returncode == 0, result.stderr
