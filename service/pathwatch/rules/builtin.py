"""The built-in rules. The parity rule reproduces the Splunk ESCU detection's semantics exactly."""

from __future__ import annotations

from pathwatch.rules.model import Risk, Rule

PARITY_RULE_ID = "kubernetes_process_running_from_new_path"

PARITY_RULE = Rule(
    id=PARITY_RULE_ID,
    name="Kubernetes Process Running From New Path",
    search_name="ESCU - Kubernetes Process Running From New Path - Rule",
    key_fields=(
        "host.name",
        "k8s.cluster.name",
        "k8s.node.name",
        "process.pid",
        "process.executable.path",
        "process.executable.name",
    ),
    # The reference counts process.memory.utilization only, which the collector leaves off by
    # default; any process.* metric is an equally good sign that the process was alive.
    metrics=("process.*",),
    window_minutes=60,
    baseline_minutes=30 * 24 * 60,
    schedule="0 * * * *",
    risk=Risk(
        impact=50,
        confidence=50,
        message="Kubernetes Process Running From New Path on host $host$",
    ),
)

# Presets: off by default, each fixing a weakness of the reference rule. 24 h of learning keeps
# a new node (or a new cluster) from raising an alert for every process it runs.
_PRESET = {"enabled": False, "learning_period_minutes": 24 * 60, "schedule": "*/5 * * * *"}

NEW_PATH_PER_NODE = Rule(
    id="kubernetes_process_new_path_per_node",
    name="Kubernetes Process Running From New Path On Node",
    search_name="pathwatch - Kubernetes Process New Path Per Node",
    key_fields=("host.name", "k8s.cluster.name", "k8s.node.name", "process.executable.path"),
    risk=Risk(message="Process running from new path $process.executable.path$ on host $host$"),
    **_PRESET,  # type: ignore[arg-type]
)

PREVIOUSLY_UNSEEN_PROCESS = Rule(
    id="kubernetes_previously_unseen_process",
    name="Kubernetes Previously Unseen Process",
    search_name="pathwatch - Kubernetes Previously Unseen Process",
    key_fields=("host.name", "k8s.cluster.name", "k8s.node.name", "process.executable.name"),
    risk=Risk(message="Previously unseen process $process.executable.name$ on host $host$"),
    **_PRESET,  # type: ignore[arg-type]
)

NEW_PATH_IN_CLUSTER = Rule(
    id="kubernetes_process_new_path_in_cluster",
    name="Kubernetes Process Running From Path New To The Cluster",
    search_name="pathwatch - Kubernetes Process New Path In Cluster",
    key_fields=("k8s.cluster.name", "process.executable.path"),
    risk=Risk(
        impact=60,
        confidence=60,
        message="Executable path $process.executable.path$ never ran before in cluster "
        "$k8s.cluster.name$",
        object_field="k8s.cluster.name",
        object_type="other",
    ),
    **_PRESET,  # type: ignore[arg-type]
)

BUILTIN_RULES: dict[str, Rule] = {
    r.id: r
    for r in (PARITY_RULE, NEW_PATH_PER_NODE, PREVIOUSLY_UNSEEN_PROCESS, NEW_PATH_IN_CLUSTER)
}
PRESET_IDS = (NEW_PATH_PER_NODE.id, PREVIOUSLY_UNSEEN_PROCESS.id, NEW_PATH_IN_CLUSTER.id)
