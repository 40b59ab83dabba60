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

BUILTIN_RULES: dict[str, Rule] = {PARITY_RULE_ID: PARITY_RULE}
