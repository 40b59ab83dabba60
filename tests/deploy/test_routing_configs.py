"""The collector configurations for routing to shards (deploy/collector/sharding/).

No collector binary is available offline, so each config is checked against a small schema
written here from the components' published configuration structs (config.go and
config.schema.yaml in open-telemetry/opentelemetry-collector and -contrib): field names,
required fields and allowed values. Only the facts are kept; the checker is this file's own.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import DEPLOY, Manifest, load_manifests, one, validate_kubernetes

SHARDING = DEPLOY / "collector" / "sharding"
AGENT_CONFIG = DEPLOY / "collector" / "agent-config.yaml"
DAEMONSET = DEPLOY / "collector" / "daemonset.yaml"
AGENT_TO_SHARD = SHARDING / "agent-to-shard.yaml"
GATEWAY_ROUTING = SHARDING / "gateway-routing.yaml"
GATEWAY_LB = SHARDING / "gateway-loadbalancing.yaml"
GATEWAY = SHARDING / "gateway.yaml"
GATEWAY_RBAC = SHARDING / "gateway-rbac.yaml"
CONFIGS = (AGENT_TO_SHARD, GATEWAY_ROUTING, GATEWAY_LB)

# StatefulSet `pathwatch` behind headless Service `pathwatch-headless` in namespace `pathwatch`.
SHARD_ENDPOINT = re.compile(
    r"pathwatch-(\d+)\.pathwatch-headless\.pathwatch\.svc\.cluster\.local:4317"
)
HEADLESS = "pathwatch-headless.pathwatch"

# -- a small schema language -------------------------------------------------------------------

DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+|0")


@dataclass
class Obj:
    """A struct: its known fields, which of them are required."""

    fields: dict[str, Any]
    required: frozenset[str] = frozenset()
    removed: dict[str, str] = field(default_factory=dict)  # key -> why it is refused


@dataclass
class ListOf:
    item: Any


@dataclass
class MapOf:
    value: Any


@dataclass
class Enum:
    values: tuple[str, ...]


class Duration:
    """A Go duration string such as 5s or 1h30m."""


class Anything:
    """Not described here (checked elsewhere)."""


def check(value: Any, schema: Any, path: str = "") -> list[str]:
    """Every mismatch between `value` and `schema`, as 'path: problem' strings."""
    where = path or "/"
    if isinstance(schema, type) and issubclass(schema, Anything):
        return []
    if isinstance(schema, Obj):
        if value is None:  # `key:` with nothing under it is an empty struct for the collector
            value = {}
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {value!r}"]
        errors = [f"{path}/{k}: {why}" for k, why in schema.removed.items() if k in value]
        errors += [f"{path}/{k}: unknown field" for k in value.keys() - schema.fields.keys()]
        errors += [f"{path}/{k}: required" for k in schema.required - value.keys()]
        for k in value.keys() & schema.fields.keys():
            errors += check(value[k], schema.fields[k], f"{path}/{k}")
        return errors
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        return [e for i, v in enumerate(value) for e in check(v, schema.item, f"{path}[{i}]")]
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {value!r}"]
        return [e for k, v in value.items() for e in check(v, schema.value, f"{path}/{k}")]
    if isinstance(schema, Enum):
        return [] if value in schema.values else [f"{where}: {value!r} not in {schema.values}"]
    if schema is Duration:
        ok = isinstance(value, str) and DURATION.fullmatch(value)
        return [] if ok else [f"{where}: {value!r} is not a duration"]
    if schema is bool or schema is str:
        ok = isinstance(value, schema)
        return [] if ok else [f"{where}: expected {schema.__name__}, got {value!r}"]
    if schema is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected an integer, got {value!r}"]
    if schema is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a number, got {value!r}"]
    raise TypeError(f"unknown schema node {schema!r}")


# -- the components' configuration, from their sources ----------------------------------------

# config/configretry (BackOffConfig).
RETRY = Obj(
    {
        "enabled": bool,
        "initial_interval": Duration,
        "randomization_factor": float,
        "multiplier": float,
        "max_interval": Duration,
        "max_elapsed_time": Duration,
    }
)

# exporter/exporterhelper queuebatch Config (sending_queue); batch_config under `batch`.
QUEUE = Obj(
    {
        "enabled": bool,
        "wait_for_result": bool,
        "block_on_overflow": bool,
        "sizer": Enum(("requests", "items", "bytes")),
        "queue_size": int,
        "num_consumers": int,
        "storage": str,
        "batch": Obj(
            {
                "flush_timeout": Duration,
                "min_size": int,
                "max_size": int,
                "sizer": Enum(("requests", "items", "bytes")),
                "partition": Obj({"metadata_keys": ListOf(str)}),
            }
        ),
    }
)

# config/configtls ClientConfig (Config plus the client-only fields).
TLS_CLIENT = Obj(
    {
        "insecure": bool,
        "insecure_skip_verify": bool,
        "server_name_override": str,
        "ca_file": str,
        "ca_pem": str,
        "cert_file": str,
        "cert_pem": str,
        "key_file": str,
        "key_pem": str,
        "cipher_suites": ListOf(str),
        "curve_preferences": ListOf(str),
        "include_system_ca_certs_pool": bool,
        "min_version": str,
        "max_version": str,
        "reload_interval": Duration,
        "tpm": Anything,
    }
)

# config/configcompression types.
COMPRESSION = Enum(("gzip", "zlib", "deflate", "snappy", "zstd", "lz4", "none", ""))

# config/configgrpc ClientConfig.
GRPC_CLIENT_FIELDS: dict[str, Any] = {
    "endpoint": str,
    "compression": COMPRESSION,
    "tls": TLS_CLIENT,
    "keepalive": Obj({"time": Duration, "timeout": Duration, "permit_without_stream": bool}),
    "read_buffer_size": int,
    "write_buffer_size": int,
    "wait_for_ready": bool,
    "headers": MapOf(str),
    "balancer_name": str,
    "authority": str,
    "auth": Obj({"authenticator": str}),
    "middlewares": ListOf(Anything),
}

# exporter/otlpexporter Config: TimeoutConfig (squashed), ClientConfig (squashed), retry, queue.
OTLP_FIELDS = {
    **GRPC_CLIENT_FIELDS,
    "timeout": Duration,
    "retry_on_failure": RETRY,
    "sending_queue": QUEUE,
}
OTLP_EXPORTER = Obj(OTLP_FIELDS, required=frozenset({"endpoint"}))
# Inside loadbalancing's protocol.otlp the exporter sets the endpoint per backend (README).
OTLP_TEMPLATE = Obj(
    {k: v for k, v in OTLP_FIELDS.items() if k != "endpoint"},
    removed={"endpoint": "set per backend by the loadbalancing exporter"},
)

# exporter/loadbalancingexporter Config.
ROUTING_KEYS = ("service", "traceID", "metric", "resource", "streamID", "attributes")
LOADBALANCING = Obj(
    {
        "timeout": Duration,
        "retry_on_failure": RETRY,
        "sending_queue": QUEUE,
        "protocol": Obj({"otlp": OTLP_TEMPLATE}, required=frozenset({"otlp"})),
        "resolver": Obj(
            {
                "static": Obj({"hostnames": ListOf(str)}),
                "dns": Obj(
                    {"hostname": str, "port": str, "interval": Duration, "timeout": Duration},
                    required=frozenset({"hostname"}),
                ),
                "k8s": Obj(
                    {
                        "service": str,
                        "ports": ListOf(int),
                        "timeout": Duration,
                        "return_hostnames": bool,
                    },
                    required=frozenset({"service"}),
                ),
                "aws_cloud_map": Obj(
                    {
                        "namespace": str,
                        "service_name": str,
                        "health_status": str,
                        "interval": Duration,
                        "timeout": Duration,
                        "port": int,
                    }
                ),
            }
        ),
        "routing_key": Enum(ROUTING_KEYS),
        "routing_attributes": ListOf(str),
    },
    required=frozenset({"protocol", "resolver"}),
)

# connector/routingconnector Config.
ROUTE = Obj(
    {
        "context": Enum(("resource", "span", "metric", "datapoint", "log", "request")),
        "statement": str,
        "condition": str,
        "pipelines": ListOf(str),
        "action": str,
    },
    required=frozenset({"pipelines"}),
)
ROUTING = Obj(
    {
        "error_mode": Enum(("propagate", "ignore", "silent")),
        "default_pipelines": ListOf(str),
        "table": ListOf(ROUTE),
    },
    required=frozenset({"table"}),
    removed={"match_once": "deprecated in v0.116.0, removed in v0.120.0"},
)

# exporter/debugexporter.
DEBUG = Obj(
    {
        "verbosity": Enum(("basic", "normal", "detailed")),
        "sampling_initial": int,
        "sampling_thereafter": int,
        "use_internal_logger": bool,
    }
)

# receiver/otlpreceiver: protocols.grpc is a configgrpc ServerConfig (with confignet's endpoint).
GRPC_SERVER = Obj(
    {
        "endpoint": str,
        "transport": str,
        "tls": Anything,
        "max_recv_msg_size_mib": int,
        "max_concurrent_streams": int,
        "read_buffer_size": int,
        "write_buffer_size": int,
        "keepalive": Anything,
        "include_metadata": bool,
        "auth": Anything,
        "middlewares": ListOf(Anything),
    }
)
OTLP_RECEIVER = Obj({"protocols": Obj({"grpc": GRPC_SERVER, "http": Anything})})

# internal/memorylimiter Config (gcstats model squashed).
MEMORY_LIMITER = Obj(
    {
        "check_interval": Duration,
        "limit_mib": int,
        "spike_limit_mib": int,
        "limit_percentage": int,
        "spike_limit_percentage": int,
        "min_gc_interval_when_soft_limited": Duration,
        "min_gc_interval_when_hard_limited": Duration,
        "model": str,
        "admission": Anything,
    },
    required=frozenset({"check_interval"}),
)
# processor/batchprocessor Config.
BATCH = Obj(
    {
        "timeout": Duration,
        "send_batch_size": int,
        "send_batch_max_size": int,
        "metadata_keys": ListOf(str),
        "metadata_cardinality_limit": int,
    }
)
HEALTH_CHECK = Obj({"endpoint": str, "path": str})

# Component type -> schema. hostmetrics and the resource processor appear only in (a), which is
# checked to be agent-config.yaml (tested by test_collector_manifests.py) but for two values.
SCHEMAS: dict[str, dict[str, Any]] = {
    "receivers": {"otlp": OTLP_RECEIVER, "hostmetrics": Anything},
    "processors": {"memory_limiter": MEMORY_LIMITER, "batch": BATCH, "resource": Anything},
    "exporters": {
        "otlp": OTLP_EXPORTER,
        "otlp_grpc": OTLP_EXPORTER,
        "loadbalancing": LOADBALANCING,
        "load_balancing": LOADBALANCING,
        "debug": DEBUG,
    },
    "connectors": {"routing": ROUTING},
    "extensions": {"health_check": HEALTH_CHECK},
}
SIGNALS = ("metrics", "traces", "logs")


def component_type(name: str) -> str:
    """`type[/name]` -> type."""
    return name.split("/", 1)[0]


def check_collector_config(config: dict[str, Any]) -> list[str]:
    """Schema of every component, the components' own rules, and the service's references."""
    errors: list[str] = []
    unknown = config.keys() - {*SCHEMAS, "service"}
    errors += [f"/{k}: unknown top-level section" for k in unknown]
    for section, known in SCHEMAS.items():
        for name, body in (config.get(section) or {}).items():
            schema = known.get(component_type(name))
            if schema is None:
                errors.append(f"/{section}/{name}: component type not described here")
                continue
            errors += check(body, schema, f"/{section}/{name}")
    errors += check_component_rules(config)
    errors += check_service(config)
    return errors


def check_component_rules(config: dict[str, Any]) -> list[str]:
    """The Validate() rules of routing and loadbalancing that a field schema cannot say."""
    errors: list[str] = []
    for name, body in (config.get("connectors") or {}).items():
        if component_type(name) != "routing":
            continue
        if not body.get("table"):
            errors.append(f"/connectors/{name}/table: the routing table is empty")
        for i, route in enumerate(body.get("table") or []):
            where = f"/connectors/{name}/table[{i}]"
            if ("statement" in route) == ("condition" in route):
                errors.append(f"{where}: exactly one of statement and condition")
            if not route.get("pipelines"):
                errors.append(f"{where}: no pipelines")
            if route.get("context") == "request" and "condition" not in route:
                errors.append(f"{where}: the request context requires a condition")
    for name, body in (config.get("exporters") or {}).items():
        if component_type(name) not in ("loadbalancing", "load_balancing"):
            continue
        where = f"/exporters/{name}"
        resolvers = [r for r in (body.get("resolver") or {}) if body["resolver"][r] is not None]
        if len(resolvers) != 1:
            errors.append(f"{where}/resolver: exactly one resolver, found {resolvers}")
        attributes = body.get("routing_attributes") or []
        if body.get("routing_key") == "attributes" and not attributes:
            errors.append(f"{where}: routing_attributes is required with routing_key attributes")
        if body.get("routing_key") != "attributes" and attributes:
            errors.append(f"{where}: routing_attributes only with routing_key attributes")
    return errors


def check_service(config: dict[str, Any]) -> list[str]:
    """Pipelines name defined components; each connector is an exporter of one pipeline and a
    receiver of another; every defined component is used."""
    errors: list[str] = []
    service = config.get("service") or {}
    errors += [
        f"/service/{k}: unknown field"
        for k in service.keys() - {"extensions", "pipelines", "telemetry"}
    ]
    defined = {s: set(config.get(s) or {}) for s in SCHEMAS}
    connectors = defined["connectors"]
    used: dict[str, set[str]] = {s: set() for s in SCHEMAS}
    for ext in service.get("extensions") or []:
        if ext not in defined["extensions"]:
            errors.append(f"/service/extensions: {ext} is not defined")
        used["extensions"].add(ext)
    pipelines = service.get("pipelines") or {}
    if not pipelines:
        errors.append("/service/pipelines: none")
    as_exporter: set[str] = set()
    as_receiver: set[str] = set()
    for pid, pipeline in pipelines.items():
        where = f"/service/pipelines/{pid}"
        if component_type(pid) not in SIGNALS:
            errors.append(f"{where}: unknown signal")
        errors += [
            f"{where}/{k}: unknown field"
            for k in pipeline.keys() - {"receivers", "processors", "exporters"}
        ]
        for kind in ("receivers", "exporters"):
            if not pipeline.get(kind):
                errors.append(f"{where}/{kind}: required")
        for kind in ("receivers", "processors", "exporters"):
            for name in pipeline.get(kind) or []:
                if kind != "processors" and name in connectors:
                    (as_receiver if kind == "receivers" else as_exporter).add(name)
                    used["connectors"].add(name)
                elif name in defined[kind]:
                    used[kind].add(name)
                else:
                    errors.append(f"{where}/{kind}: {name} is not defined")
    for name in connectors:
        if name not in as_exporter or name not in as_receiver:
            errors.append(f"/connectors/{name}: must be an exporter and a receiver of pipelines")
    for section, names in defined.items():
        errors += [f"/{section}/{n}: defined but not used" for n in names - used[section]]
    return errors


def load(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return config


# -- the checker catches what it should -----------------------------------------------------------


def test_checker_refuses_unknown_missing_and_misspelled_fields() -> None:
    """The schema checker reports an unknown key, a missing required field, a wrong value, a
    removed field and a dangling pipeline reference, so the passing configs mean something."""
    config = load(GATEWAY_LB)
    lb = config["exporters"]["loadbalancing"]
    lb["routing_atributes"] = lb.pop("routing_attributes")
    lb["resolver"]["k8s"]["return_hostname"] = True
    lb["protocol"]["otlp"]["endpoint"] = "x:4317"
    lb["protocol"]["otlp"]["retry_on_failure"]["max_elapsed_time"] = "an hour"
    config["service"]["pipelines"]["metrics"]["processors"].append("batch/missing")
    errors = "\n".join(check_collector_config(config))
    for expected in (
        "/exporters/loadbalancing/routing_atributes: unknown field",
        "/exporters/loadbalancing/resolver/k8s/return_hostname: unknown field",
        "/exporters/loadbalancing/protocol/otlp/endpoint: set per backend",
        "max_elapsed_time: 'an hour' is not a duration",
        "routing_attributes is required with routing_key attributes",
        "processors: batch/missing is not defined",
    ):
        assert expected in errors
    routing = load(GATEWAY_ROUTING)
    routing["connectors"]["routing"]["match_once"] = True
    del routing["connectors"]["routing"]["table"][0]["condition"]
    del routing["exporters"]["otlp/pathwatch-0"]["endpoint"]
    errors = "\n".join(check_collector_config(routing))
    assert "match_once: deprecated in v0.116.0, removed in v0.120.0" in errors
    assert "table[0]: exactly one of statement and condition" in errors
    assert "/exporters/otlp/pathwatch-0/endpoint: required" in errors


# -- every config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_matches_the_components_schemas(path: Path) -> None:
    """Every key of every component is a known field with a value of the right kind, required
    fields are present, and the pipelines reference defined components only."""
    assert check_collector_config(load(path)) == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_names_its_collector_version_and_the_deployment_runs_it(path: Path) -> None:
    """Each file's header names the otelcol-contrib version it is written for, and the image
    that runs it (the agent DaemonSet for (a), the gateway Deployment for (b)/(c)) is that
    version."""
    header = path.read_text(encoding="utf-8").split("\n\n", 1)[0]
    (version,) = re.findall(r"otelcol-contrib (\d+\.\d+\.\d+)", header)
    runner = DAEMONSET if path == AGENT_TO_SHARD else GATEWAY
    kind = "DaemonSet" if path == AGENT_TO_SHARD else "Deployment"
    (container,) = one(load_manifests(runner.read_text(encoding="utf-8")), kind)["spec"][
        "template"
    ]["spec"]["containers"]
    assert container["image"] == f"otel/opentelemetry-collector-contrib:{version}"


def otlp_endpoints(config: dict[str, Any]) -> dict[str, str]:
    return {
        name: body["endpoint"]
        for name, body in config["exporters"].items()
        if component_type(name) in ("otlp", "otlp_grpc")
    }


@pytest.mark.parametrize("path", (AGENT_TO_SHARD, GATEWAY_ROUTING), ids=lambda p: p.name)
def test_every_exporter_dials_a_shard_pod_name_on_4317(path: Path) -> None:
    """Each otlp exporter's endpoint is a shard pod's DNS name under the headless Service
    pathwatch-headless in namespace pathwatch, port 4317, and waits for it: queue and retries on,
    a timeout above pathwatch's 10 s ack timeout."""
    config = load(path)
    endpoints = otlp_endpoints(config)
    assert endpoints
    for name, endpoint in endpoints.items():
        assert SHARD_ENDPOINT.fullmatch(endpoint), endpoint
        exporter = config["exporters"][name]
        assert exporter["sending_queue"]["enabled"] is True
        assert exporter["sending_queue"]["queue_size"] > 0
        assert exporter["retry_on_failure"]["enabled"] is True
        assert exporter["retry_on_failure"]["max_elapsed_time"] != "0"  # 0 would retry forever
        assert int(exporter["timeout"].removesuffix("s")) > 10


# -- (a) ---------------------------------------------------------------------------------------


def test_agent_to_shard_is_the_agent_config_but_cluster_and_endpoint() -> None:
    """(a) equals deploy/collector/agent-config.yaml except for k8s.cluster.name and the otlp
    endpoint, so the agent's tested settings carry over and the two cannot drift apart."""
    agent, sharded = load(AGENT_CONFIG), load(AGENT_TO_SHARD)
    for config in (agent, sharded):
        for attr in config["processors"]["resource"]["attributes"]:
            if attr["key"] == "k8s.cluster.name":
                attr["value"] = "CLUSTER"
        config["exporters"]["otlp"]["endpoint"] = "ENDPOINT"
    assert sharded == agent


# -- (b) ---------------------------------------------------------------------------------------

ROUTE_CONDITION = re.compile(r'attributes\["k8s\.cluster\.name"\] == "([A-Za-z0-9._-]+)"')


def test_routing_table_sends_each_cluster_to_exactly_one_shard() -> None:
    """Each route compares the resource's k8s.cluster.name with one cluster and leads to one
    pipeline that exports to one shard; no cluster appears twice; unmatched data goes to a
    default pipeline that is not a shard."""
    config = load(GATEWAY_ROUTING)
    routing = config["connectors"]["routing"]
    pipelines = config["service"]["pipelines"]
    clusters: dict[str, str] = {}
    for route in routing["table"]:
        assert route.get("context", "resource") == "resource"
        (cluster,) = [m.group(1) for m in [ROUTE_CONDITION.fullmatch(route["condition"])] if m]
        assert cluster not in clusters, f"{cluster} routed twice"
        (pipeline,) = route["pipelines"]
        assert pipelines[pipeline]["receivers"] == ["routing"]
        (exporter,) = pipelines[pipeline]["exporters"]
        clusters[cluster] = config["exporters"][exporter]["endpoint"]
    assert len(set(clusters.values())) == len(clusters), "one shard per cluster in the example"
    for pid in routing["default_pipelines"]:
        for exporter in pipelines[pid]["exporters"]:
            assert component_type(exporter) == "debug"
    (into,) = [p for p in pipelines.values() if "routing" in p["exporters"]]
    assert into["receivers"] == ["otlp"]


# -- (c) ---------------------------------------------------------------------------------------


def test_loadbalancing_routes_by_cluster_to_pod_names_and_waits_for_a_shard() -> None:
    """routing_key attributes on k8s.cluster.name only; the k8s resolver on the headless Service,
    port 4317, by hostname; queue and retries per backend (protocol.otlp), none at the top
    level, where a retry would be hashed again."""
    config = load(GATEWAY_LB)
    (name,) = config["service"]["pipelines"]["metrics"]["exporters"]
    lb = config["exporters"][name]
    assert component_type(name) in ("loadbalancing", "load_balancing")
    assert lb["routing_key"] == "attributes"
    assert lb["routing_attributes"] == ["k8s.cluster.name"]
    assert lb["resolver"] == {
        "k8s": {"service": HEADLESS, "ports": [4317], "return_hostnames": True}
    }
    otlp = lb["protocol"]["otlp"]
    assert otlp["sending_queue"]["enabled"] is True
    assert otlp["retry_on_failure"]["enabled"] is True
    assert int(otlp["timeout"].removesuffix("s")) > 10
    assert lb["retry_on_failure"] == {"enabled": False}
    assert lb["sending_queue"] == {"enabled": False}


# A model of the exporter's ring (consistent_hashing.go), to check what the config's comments
# say about membership changes and to compute which shard gets which cluster.
RING_POSITIONS = 36000
POINTS_PER_BACKEND = 100


def ring(backends: list[str]) -> list[tuple[int, str]]:
    """(position, backend) sorted; a position taken by an earlier backend stays with it."""
    taken: dict[int, str] = {}
    for backend in backends:
        for i in range(POINTS_PER_BACKEND):
            position = zlib.crc32(backend.encode() + bytes([i])) % RING_POSITIONS
            taken.setdefault(position, backend)
    return sorted(taken.items())


def owner(points: list[tuple[int, str]], key: str) -> str:
    """The backend of the first point at or after the key's position, wrapping round."""
    position = zlib.crc32(key.encode()) % RING_POSITIONS
    for point, backend in points:
        if point >= position:
            return backend
    return points[0][1]


def backend_name(ordinal: int) -> str:
    """What the k8s resolver with return_hostnames produces for shard pod `ordinal`."""
    return f"pathwatch-{ordinal}.{HEADLESS}:4317"


def placement(clusters: list[str], shards: int) -> dict[str, str]:
    """Cluster -> backend, for the current key encoding ("name=value|")."""
    points = ring(sorted(backend_name(n) for n in range(shards)))
    return {c: owner(points, f"k8s.cluster.name={c}|") for c in clusters}


def test_ring_moves_only_the_clusters_of_a_changed_shard() -> None:
    """In the model of the ring: removing a shard moves only the clusters it held; adding one
    moves clusters only to the new shard, roughly 1/N of them, as the (c) config says."""
    clusters = [f"cluster-{n:03d}" for n in range(300)]
    three, two, four = placement(clusters, 3), placement(clusters, 2), placement(clusters, 4)
    removed = backend_name(2)
    for cluster in clusters:
        if three[cluster] != removed:
            assert two[cluster] == three[cluster]
        if four[cluster] != three[cluster]:
            assert four[cluster] == backend_name(3)
    moved = sum(four[c] != three[c] for c in clusters)
    assert 0.1 * len(clusters) < moved < 0.45 * len(clusters)
    assert set(three.values()) == {backend_name(n) for n in range(3)}


# -- the Kubernetes objects ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_objects() -> list[Manifest]:
    return load_manifests(GATEWAY.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rbac_objects() -> list[Manifest]:
    return load_manifests(GATEWAY_RBAC.read_text(encoding="utf-8"))


def test_gateway_manifests_are_valid_kubernetes(
    gateway_objects: list[Manifest], rbac_objects: list[Manifest]
) -> None:
    """ServiceAccount, Deployment, Service, Role and RoleBinding pass the Kubernetes API schemas
    strictly, all in namespace pathwatch."""
    objects = gateway_objects + rbac_objects
    assert sorted(o["kind"] for o in objects) == [
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    for obj in objects:
        validate_kubernetes(obj)
        assert obj["metadata"]["namespace"] == "pathwatch"


def test_gateway_runs_the_config_its_header_tells_to_create(
    gateway_objects: list[Manifest],
) -> None:
    """The Deployment mounts the ConfigMap the header's `kubectl create configmap` commands
    make from (b) or (c) under key gateway.yaml, points --config at it, and the Service exposes
    the receiver's port 4317."""
    header = GATEWAY.read_text(encoding="utf-8").split("\napiVersion:", 1)[0]
    made = re.findall(r"create configmap (\S+) \\\n#\s+--from-file=(\S+?)=(\S+)", header)
    assert {Path(src).name for _, _, src in made} == {GATEWAY_ROUTING.name, GATEWAY_LB.name}
    ((configmap, key),) = {(cm, k) for cm, k, _ in made}
    pod = one(gateway_objects, "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
    assert c["args"] == [f"--config={mount['mountPath']}/{key}"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["otlp-grpc"] == 4317
    service = one(gateway_objects, "Service")
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (4317, "otlp-grpc")
    labels = one(gateway_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    for path in (GATEWAY_ROUTING, GATEWAY_LB):
        grpc = load(path)["receivers"]["otlp"]["protocols"]["grpc"]
        assert grpc["endpoint"].endswith(":4317")
        env = {e["name"] for e in c["env"]}
        assert set(re.findall(r"\$\{env:(\w+)\}", yaml.safe_dump(load(path)))) <= env


def test_resolver_may_read_endpointslices_of_the_shards_namespace(
    gateway_objects: list[Manifest], rbac_objects: list[Manifest]
) -> None:
    """The Role grants get/list/watch on endpointslices (and endpoints, for releases before
    v0.140) in the headless Service's namespace, and nothing else; the RoleBinding gives it to
    the gateway's ServiceAccount, whose token the pod mounts."""
    role, binding = one(rbac_objects, "Role"), one(rbac_objects, "RoleBinding")
    assert role["metadata"]["namespace"] == HEADLESS.split(".")[1]
    grants = {
        (g, r): sorted(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert grants == {
        ("discovery.k8s.io", "endpointslices"): ["get", "list", "watch"],
        ("", "endpoints"): ["get", "list", "watch"],
    }
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = one(gateway_objects, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    pod = one(gateway_objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]
    assert pod["automountServiceAccountToken"] is True
