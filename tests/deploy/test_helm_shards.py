"""The Helm chart's shards (values `shards` and `shardClusters`): a StatefulSet of shards, each
owning the clusters assigned to its ordinal, rendered offline by the Helm SDK as `helm template`
would, validated against the Kubernetes schemas and loaded with pathwatch's own config loader."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from pathwatch.config import Config, load_config
from tests.deploy.support import (
    API_TOKEN_FILE,
    CHART,
    CRD_KINDS,
    PORTS,
    WEBHOOK_SECRET,
    Manifest,
    by_kind,
    load_manifests,
    one,
    validate_kubernetes,
)

RELEASE, NAMESPACE = "pw", "sec"
FULLNAME = "pw-pathwatch"
HEADLESS = f"{FULLNAME}-headless"

ASSIGNMENT = {
    0: ["prod-eu", "prod-us"],
    1: ["staging-*"],
    # A numeric-looking name must stay a string in the config file.
    2: ["2024", "dev-*"],
}
SHARDS: dict[str, Any] = {"shards": 3, "shardClusters": ASSIGNMENT}

# The chart's features switched on with shards, as a production install would.
FULL: dict[str, Any] = {
    **SHARDS,
    "serviceMonitor": {
        "enabled": True,
        "labels": {"release": "kube-prometheus-stack"},
        "relabelings": [{"targetLabel": "team", "replacement": "secops"}],
    },
    "prometheusRule": {"enabled": True},
    "networkPolicy": {"egress": {"enabled": True}},
    "persistence": {"storageClass": "fast", "size": "50Gi", "annotations": {"a": "b"}},
    "secretEnv": [
        {"name": "PATHWATCH_WEBHOOK_SECRET", "secretName": "pathwatch-webhook", "key": "secret"}
    ],
    "config": {
        "sinks": [
            {
                "name": "soc",
                "type": "webhook",
                "url": "https://soc.example.com/hooks/pathwatch",
                "secret_env": "PATHWATCH_WEBHOOK_SECRET",
            }
        ]
    },
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
def sharded(chart: helm_python.Chart) -> list[Manifest]:
    return render(chart, SHARDS)


@pytest.fixture(scope="module")
def full(chart: helm_python.Chart) -> list[Manifest]:
    return render(chart, FULL)


def pod_template(objects: list[Manifest]) -> dict[str, Any]:
    template: dict[str, Any] = one(objects, "StatefulSet")["spec"]["template"]
    return template


def container(objects: list[Manifest]) -> dict[str, Any]:
    (c,) = pod_template(objects)["spec"]["containers"]
    return dict(c)


def pod_labels(objects: list[Manifest]) -> dict[str, str]:
    """The labels of a shard pod: the template's, plus those the StatefulSet controller adds."""
    labels: dict[str, str] = pod_template(objects)["metadata"]["labels"]
    return {**labels, "apps.kubernetes.io/pod-index": "0"}


def config_map(objects: list[Manifest]) -> Manifest:
    """pathwatch's configuration ConfigMap (not the Grafana dashboard's)."""
    (found,) = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"] == FULLNAME]
    return found


def load_shard_config(text: str, tmp_path: Path, name: str) -> Config:
    """`text` loaded by pathwatch's own loader, with no environment, the mounted token file
    pointing at a local file."""
    token = tmp_path / f"{name}-token"
    token.write_text("a-token", encoding="utf-8")
    path = tmp_path / name
    path.write_text(text.replace(API_TOKEN_FILE, str(token)), encoding="utf-8")
    return load_config(str(path), env={})


def pod_config_path(objects: list[Manifest], ordinal: int) -> str:
    """The --config argument as the kubelet expands it for the pod of `ordinal`: $(VAR) takes
    the value of an env var, here the downward API's pod-index label."""
    c = container(objects)
    env = {e["name"]: e for e in c["env"]}
    arg: str = c["args"][c["args"].index("--config") + 1]

    def expand(match: re.Match[str]) -> str:
        var = env[match.group(1)]
        field = var["valueFrom"]["fieldRef"]["fieldPath"]
        assert field == "metadata.labels['apps.kubernetes.io/pod-index']", field
        return str(ordinal)

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, arg)


# -- what shards render ------------------------------------------------------------------------


def test_shards_render_a_stateful_set_instead_of_the_deployment(sharded: list[Manifest]) -> None:
    """shards: 3 renders a StatefulSet of 3 pods behind the headless Service, started in
    parallel and rolled one at a time, with a PodDisruptionBudget; no Deployment, no standalone
    PVC and no load-balanced Service."""
    kinds = sorted(o["kind"] for o in sharded)
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]
    assert by_kind(sharded, "Deployment") == []
    assert by_kind(sharded, "PersistentVolumeClaim") == []
    sts = one(sharded, "StatefulSet")
    assert sts["metadata"]["name"] == FULLNAME
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["serviceName"] == HEADLESS
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"] == {"type": "RollingUpdate"}
    assert spec["selector"]["matchLabels"].items() <= pod_labels(sharded).items()
    assert {o["metadata"]["namespace"] for o in sharded} == {NAMESPACE}


def test_each_shard_gets_its_own_volume(full: list[Manifest]) -> None:
    """volumeClaimTemplates give every shard its claim (data-<pod>) from the persistence
    values, mounted at the data dir; the claims keep only labels that never change (a
    StatefulSet's claim templates are immutable) and survive a scale-down."""
    sts = one(full, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["metadata"]["labels"] == sts["spec"]["selector"]["matchLabels"]
    assert claim["metadata"]["annotations"] == {"a": "b"}
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "fast",
        "resources": {"requests": {"storage": "50Gi"}},
    }
    mounts = {m["mountPath"]: m["name"] for m in container(full)["volumeMounts"]}
    assert mounts["/var/lib/pathwatch"] == "data"
    volumes = {v["name"] for v in pod_template(full)["spec"]["volumes"]}
    assert "data" not in volumes, "the pod's data volume must be the claim template's"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }


def test_without_persistence_each_shard_has_an_empty_dir(chart: helm_python.Chart) -> None:
    """persistence.enabled false: no claim templates, each shard's data dir is an emptyDir."""
    objects = render(chart, {**SHARDS, "persistence": {"enabled": False}})
    sts = one(objects, "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    volumes = {v["name"]: v for v in pod_template(objects)["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    for obj in objects:
        validate_kubernetes(obj)


def test_headless_service_publishes_every_shard(sharded: list[Manifest]) -> None:
    """The only Service is headless (clusterIP None), named <fullname>-headless as the
    StatefulSet's serviceName, publishes not-ready addresses (a restarting shard keeps its DNS
    name in the collectors' resolvers), selects the shard pods and exposes the OTLP and admin
    ports by their container port names."""
    service = one(sharded, "Service")
    assert service["metadata"]["name"] == HEADLESS
    spec = service["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    assert "type" not in spec
    assert spec["selector"].items() <= pod_labels(sharded).items()
    ports = {p["name"]: p for p in spec["ports"]}
    assert {name: p["port"] for name, p in ports.items()} == PORTS
    container_ports = {p["name"] for p in container(sharded)["ports"]}
    assert {p["targetPort"] for p in ports.values()} == container_ports


def test_disruption_budget_lets_one_shard_go_at_a_time(sharded: list[Manifest]) -> None:
    """The PodDisruptionBudget (policy/v1) selects the shard pods with maxUnavailable 1."""
    pdb = one(sharded, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["name"] == FULLNAME
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(sharded).items()


# -- each shard's config ----------------------------------------------------------------------


def test_each_ordinal_has_a_config_file_with_its_shard(
    sharded: list[Manifest], tmp_path: Path
) -> None:
    """The ConfigMap holds config-0.yaml ... config-2.yaml and no other file; each is the
    chart's config plus shard.name (the pod's name) and shard.clusters (its assignment), and
    pathwatch's own loader accepts it."""
    data = config_map(sharded)["data"]
    assert sorted(data) == ["config-0.yaml", "config-1.yaml", "config-2.yaml"]
    base: dict[str, Any] | None = None
    for ordinal, clusters in ASSIGNMENT.items():
        text = data[f"config-{ordinal}.yaml"]
        raw = yaml.safe_load(text)
        assert raw["shard"] == {"name": f"{FULLNAME}-{ordinal}", "clusters": clusters}
        rest = {k: v for k, v in raw.items() if k != "shard"}
        if base is None:
            base = rest
        assert rest == base, "the shards' configs differ only in shard"
        config = load_shard_config(text, tmp_path, f"config-{ordinal}.yaml")
        assert config.shard.name == f"{FULLNAME}-{ordinal}"
        assert config.shard.clusters == clusters
        assert config.data_dir == "/var/lib/pathwatch"
    assert base is not None and base["http"]["auth"] == {"bearer_token_file": API_TOKEN_FILE}


def test_custom_config_reaches_every_shard(full: list[Manifest], tmp_path: Path) -> None:
    """The user's config (a sink here) is in every shard's file, which pathwatch loads with the
    sink's secret variable set."""
    for ordinal, clusters in ASSIGNMENT.items():
        text = config_map(full)["data"][f"config-{ordinal}.yaml"]
        assert yaml.safe_load(text)["sinks"] == FULL["config"]["sinks"]
        token = tmp_path / "token"
        token.write_text("t", encoding="utf-8")
        path = tmp_path / f"config-{ordinal}.yaml"
        path.write_text(text.replace(API_TOKEN_FILE, str(token)), encoding="utf-8")
        config = load_config(str(path), env={"PATHWATCH_WEBHOOK_SECRET": WEBHOOK_SECRET})
        assert [s.name for s in config.sinks] == ["soc"]
        assert config.shard.clusters == clusters


def test_each_pod_reads_the_file_of_its_ordinal(sharded: list[Manifest]) -> None:
    """The container gets its ordinal from the downward API (the StatefulSet's
    apps.kubernetes.io/pod-index pod label) in POD_INDEX, and `serve --config` names
    /etc/pathwatch/config-$(POD_INDEX).yaml: for each ordinal the kubelet's expansion is a file
    the mounted ConfigMap holds. No PATHWATCH_* variable is added (pathwatch reads those as
    settings)."""
    c = container(sharded)
    assert c["args"][:3] == ["serve", "--config", "/etc/pathwatch/config-$(POD_INDEX).yaml"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_INDEX"] == {
        "name": "POD_INDEX",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}},
    }
    assert {n for n in env if n.startswith("PATHWATCH_")} == {"PATHWATCH_DATA_DIR"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_template(sharded)["spec"]["volumes"]}
    config_volume = volumes[mounts["/etc/pathwatch"]["name"]]["configMap"]
    assert config_volume == {"name": config_map(sharded)["metadata"]["name"]}
    data = config_map(sharded)["data"]
    for ordinal in ASSIGNMENT:
        path = pod_config_path(sharded, ordinal)
        assert path == f"/etc/pathwatch/config-{ordinal}.yaml"
        text = data[path.removeprefix("/etc/pathwatch/")]
        assert yaml.safe_load(text)["shard"]["name"] == f"{FULLNAME}-{ordinal}"


def test_changing_one_shards_clusters_rolls_the_pods(
    chart: helm_python.Chart, sharded: list[Manifest]
) -> None:
    """The pods' checksum/config covers every shard's file: a change to one assignment changes
    it (the pods read their file only at start-up), other changes do not."""

    def checksum(objects: list[Manifest]) -> str:
        value: str = pod_template(objects)["metadata"]["annotations"]["checksum/config"]
        return value

    moved = copy.deepcopy(SHARDS)
    moved["shardClusters"][2] = ["2024"]
    assert checksum(render(chart, moved)) != checksum(sharded)
    labelled = {**SHARDS, "podLabels": {"a": "b"}}
    assert checksum(render(chart, labelled)) == checksum(sharded)
    assert re.fullmatch(r"[0-9a-f]{64}", checksum(sharded))


# -- shards: 1 is today's single replica -------------------------------------------------------


def without_token(objects: list[Manifest]) -> list[Manifest]:
    """The objects without the generated token's value (random on every render)."""
    out = copy.deepcopy(objects)
    for obj in out:
        if obj["kind"] == "Secret":
            obj["data"] = {}
    return out


def test_one_shard_renders_the_single_replica_deployment(chart: helm_python.Chart) -> None:
    """shards: 1 (with or without an empty shardClusters) renders exactly the default objects:
    the Deployment with its PVC and ClusterIP Service, no StatefulSet, headless Service or
    PodDisruptionBudget."""
    default = without_token(render(chart))
    for values in ({"shards": 1}, {"shards": 1, "shardClusters": {}}):
        objects = without_token(render(chart, values))
        assert objects == default
    assert one(default, "Deployment")["spec"]["replicas"] == 1
    assert one(default, "Service")["metadata"]["name"] == FULLNAME
    assert one(default, "PersistentVolumeClaim")["metadata"]["name"] == FULLNAME
    for kind in ("StatefulSet", "PodDisruptionBudget"):
        assert by_kind(default, kind) == []
    assert render_files(chart, {"shards": 1})["NOTES.txt"] == render_files(chart)["NOTES.txt"]


def test_replica_count_zero_scales_every_shard_down(chart: helm_python.Chart) -> None:
    """replicaCount 0 keeps its meaning with shards: the StatefulSet scales to 0."""
    objects = render(chart, {**SHARDS, "replicaCount": 0})
    assert one(objects, "StatefulSet")["spec"]["replicas"] == 0


# -- refused values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"shards": 3, "shardClusters": {0: ["prod-eu"], 1: ["staging-*"]}},
            f"shards is 3 but shardClusters assigns no cluster to shard 2 ({FULLNAME}-2)",
        ),
        (
            {"shards": 2},
            f"assigns no cluster to shard 0 ({FULLNAME}-0), 1 ({FULLNAME}-1)",
        ),
        (
            {"shards": 2, "shardClusters": {0: ["prod-eu"], 1: None}},
            f"assigns no cluster to shard 1 ({FULLNAME}-1)",
        ),
    ],
    ids=["one-missing", "none-given", "null"],
)
def test_a_shard_without_clusters_fails_the_render(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    """Every shard must own at least one cluster name or glob: rendering stops with a message
    naming the shard (ordinal and pod) and how to assign it."""
    with pytest.raises(helm_python.HelmError, match=re.escape(message)) as failure:
        render(chart, values)
    assert "every shard must own at least one cluster" in str(failure.value)


def test_clusters_of_a_shard_that_does_not_run_fail_the_render(chart: helm_python.Chart) -> None:
    """An assignment for an ordinal at or past `shards` (clusters nobody would own, e.g. after
    a scale-down) stops the render; set to null it is dropped and the chart renders."""
    values = {"shards": 2, "shardClusters": {0: ["a"], 1: ["b"], 2: ["c"]}}
    with pytest.raises(helm_python.HelmError, match=r"shard 2, but shards is 2 .*no pod"):
        render(chart, values)
    values["shardClusters"][2] = None
    assert one(render(chart, values), "StatefulSet")["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"shards": 1, "shardClusters": {0: ["prod-eu"]}}, "applies only with shards > 1"),
        ({**SHARDS, "persistence": {"existingClaim": "data"}}, "existingClaim cannot be used"),
        ({**SHARDS, "service": {"type": "LoadBalancer"}}, "service.type LoadBalancer"),
        ({**SHARDS, "config": {"shard": {"clusters": ["x"]}}}, "config.shard is set per shard"),
        ({**SHARDS, "fullnameOverride": "p" * 53}, "longer than 52 characters"),
    ],
    ids=["assignment-without-shards", "existing-claim", "load-balancer", "config-shard", "name"],
)
def test_settings_that_cannot_work_with_shards_are_refused(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    """An assignment without shards, one claim for all shards, a load-balanced Service in
    front of shards, a config.shard the chart would overwrite and a name too long for the
    StatefulSet's pod labels each stop the render with a message."""
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render(chart, values)


def test_shards_need_kubernetes_1_28(capfd: pytest.CaptureFixture[str]) -> None:
    """Rendering shards for a cluster older than 1.28 (no apps.kubernetes.io/pod-index label)
    fails. helm lint reports a template's `fail` only in its log, so the log is read."""
    capfd.readouterr()
    helm_python.lint(CHART, SHARDS, kube_version="v1.27.9")
    old = capfd.readouterr().err
    assert "shards > 1 needs Kubernetes 1.28 or later (this is v1.27.9)" in old
    report = helm_python.lint(CHART, SHARDS, strict=True, kube_version="v1.28.0")
    assert report["errors"] == []
    assert "needs Kubernetes 1.28" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"shards": 0}, "/shards"),
        ({"shards": "3"}, "/shards"),
        ({"shards": 2.5}, "/shards"),
        ({"shards": 2, "shardClusters": {"first": ["a"]}}, "/shardClusters"),
        ({"shards": 2, "shardClusters": {"01": ["a"]}}, "/shardClusters"),
        ({"shards": 2, "shardClusters": {0: "prod-eu"}}, "/shardClusters/0"),
        ({"shards": 2, "shardClusters": {0: []}}, "/shardClusters/0"),
        ({"shards": 2, "shardClusters": {0: ["a", "a"]}}, "/shardClusters/0"),
        ({"shards": 2, "shardClusters": {0: [""]}}, "/shardClusters/0/0"),
        ({"shards": 2, "shardClusters": {0: [" prod-eu"]}}, "/shardClusters/0/0"),
        ({"shards": 2, "shardClusters": {0: [2024]}}, "/shardClusters/0/0"),
        ({"shards": 2, "shardClusters": [["a"], ["b"]]}, "/shardClusters"),
    ],
)
def test_schema_rejects_bad_shard_values(
    chart: helm_python.Chart, values: dict[str, Any], where: str
) -> None:
    """values.schema.json knows shards (an integer, at least 1) and shardClusters (ordinal ->
    a non-empty list of distinct, non-blank cluster names or globs) and refuses anything else,
    naming the key."""
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(f"at '{where}'")):
        chart.validate_schema(values)


def test_schema_accepts_shards_and_still_refuses_replicas(chart: helm_python.Chart) -> None:
    """Shard values validate; replicaCount stays refused above 1 (replicas cannot share one
    RocksDB volume: shards are the way to grow)."""
    chart.validate_schema(SHARDS)
    chart.validate_schema(FULL)
    chart.validate_schema({"shards": 2, "shardClusters": {"0": ["*"], "1": ["*"], "7": None}})
    with pytest.raises(helm_python.HelmValuesError, match="/replicaCount"):
        chart.validate_schema({**SHARDS, "replicaCount": 3})


# -- validity and the rest of the chart --------------------------------------------------------


@pytest.mark.parametrize("values", [SHARDS, FULL], ids=["shards", "full"])
def test_sharded_objects_are_valid_for_kubernetes(
    chart: helm_python.Chart, values: dict[str, Any]
) -> None:
    """Each object rendered with shards passes the Kubernetes API schema strictly (no unknown
    fields) for every supported version; Prometheus Operator objects have their fields."""
    for obj in render(chart, values):
        if obj["kind"] in CRD_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert isinstance(obj["spec"], dict)
        else:
            validate_kubernetes(obj)


@pytest.mark.parametrize("values", [SHARDS, FULL], ids=["shards", "full"])
def test_sharded_chart_lints_without_warnings(values: dict[str, Any]) -> None:
    """`helm lint --strict` reports no warning or error with shards."""
    report = helm_python.lint(CHART, values, strict=True, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == [], report


def test_service_monitor_labels_each_series_with_its_shard(full: list[Manifest]) -> None:
    """The ServiceMonitor selects the headless Service, scrapes each shard pod's http port,
    keeps the job the release's full name (what the PrometheusRule and the dashboard select)
    and adds a `shard` target label from the pod's name, which is the shard.name of its
    config; the user's relabelings follow."""
    monitor = one(full, "ServiceMonitor")
    service = one(full, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert "http" in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["relabelings"] == [
        {"targetLabel": "job", "replacement": FULLNAME},
        {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "shard"},
        *FULL["serviceMonitor"]["relabelings"],
    ]
    pods = one(full, "StatefulSet")["metadata"]["name"]
    for ordinal in ASSIGNMENT:
        text = config_map(full)["data"][f"config-{ordinal}.yaml"]
        assert yaml.safe_load(text)["shard"]["name"] == f"{pods}-{ordinal}"
    rules = one(full, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert all(f'job="{FULLNAME}"' in r["expr"] for r in rules)


def test_network_policy_and_token_cover_every_shard(full: list[Manifest]) -> None:
    """The NetworkPolicy selects the shard pods (all of them share the template's labels) and
    every shard mounts the one admin token Secret its config names."""
    policy = one(full, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(full).items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    secret = one(full, "Secret")
    volumes = {v["name"]: v for v in pod_template(full)["spec"]["volumes"]}
    assert volumes["api-token"]["secret"]["secretName"] == secret["metadata"]["name"]
    for ordinal in ASSIGNMENT:
        text = config_map(full)["data"][f"config-{ordinal}.yaml"]
        assert yaml.safe_load(text)["http"]["auth"] == {"bearer_token_file": API_TOKEN_FILE}


def test_notes_give_each_shards_dns_name_and_clusters(chart: helm_python.Chart) -> None:
    """NOTES.txt lists every shard with its clusters and its stable DNS names
    <fullname>-<ordinal>.<fullname>-headless.<namespace>.svc, and port-forwards to a shard pod,
    not to a Service that no longer exists."""
    notes = render_files(chart, SHARDS)["NOTES.txt"]
    for ordinal, clusters in ASSIGNMENT.items():
        host = f"{FULLNAME}-{ordinal}.{HEADLESS}.{NAMESPACE}.svc"
        assert f"shard {FULLNAME}-{ordinal}, clusters: {', '.join(clusters)}" in notes
        assert f"{host}:4317" in notes
        assert f"http://{host}:4318" in notes
    assert "Kubernetes 1.28" in notes
    assert f"port-forward pod/{FULLNAME}-0 8080:8080" in notes
    assert f"svc/{FULLNAME} " not in notes
    assert f"{FULLNAME}.{NAMESPACE}.svc" not in notes
