"""AlertmanagerSink: POST {url}/api/v2/alerts with an explicit endsAt, so nothing is re-sent.

Labels stay low-cardinality enough for grouping (alertname, rule, host, cluster, node, severity);
details go in annotations.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pathwatch.alerts.event import parse_rfc3339, rfc3339
from pathwatch.alerts.http import HttpRequest
from pathwatch.clock import Clock
from pathwatch.config.model import SinkConfig
from pathwatch.store.alertlog import Delivery


class AlertmanagerSink:
    def __init__(self, config: SinkConfig, clock: Clock) -> None:
        self.config = config
        self.batch_size = max(1, config.batch_size)
        self._url = config.url.rstrip("/") + "/api/v2/alerts"

    def request(self, deliveries: Sequence[Delivery]) -> HttpRequest:
        alerts = []
        for d in deliveries:
            e = d.event
            f = e["fields"]
            labels = {
                "alertname": e["rule"]["name"].replace(" ", ""),
                "rule": e["rule"]["id"],
                "host": e["risk_object"],
                "k8s_cluster": f.get("k8s.cluster.name", ""),
                "k8s_node": f.get("k8s.node.name", ""),
                "severity": self.config.severity,
                "alert_id": d.alert_id,
            }
            annotations = {
                "risk_message": e["risk_message"],
                "executable_path": f.get("process.executable.path", ""),
                "executable_name": f.get("process.executable.name", ""),
                "pid": f.get("process.pid", ""),
                "risk_score": str(e["risk_score"]),
            }
            starts = parse_rfc3339(e["time"])
            alerts.append(
                {
                    "labels": {k: v for k, v in labels.items() if v},
                    "annotations": {k: v for k, v in annotations.items() if v},
                    "startsAt": rfc3339(starts),
                    "endsAt": rfc3339(starts + int(self.config.ends_after * 1000)),
                    "generatorURL": self.config.generator_url or "http://pathwatch/api/v1/alerts",
                }
            )
        return HttpRequest(
            self._url, json.dumps(alerts).encode(), {"Content-Type": "application/json"}
        )
