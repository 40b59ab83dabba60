"""CloudEventsSink: CloudEvents 1.0 structured-mode JSON, type io.pathwatch.risk.v1."""

from __future__ import annotations

import json
from collections.abc import Sequence

from pathwatch.alerts.http import HttpRequest
from pathwatch.clock import Clock
from pathwatch.config.model import SinkConfig
from pathwatch.store.alertlog import Delivery

EVENT_TYPE = "io.pathwatch.risk.v1"


class CloudEventsSink:
    batch_size = 1

    def __init__(self, config: SinkConfig, clock: Clock) -> None:
        self.config = config

    def request(self, deliveries: Sequence[Delivery]) -> HttpRequest:
        (delivery,) = deliveries
        event = delivery.event
        envelope = {
            "specversion": "1.0",
            "type": EVENT_TYPE,
            "source": self.config.source,
            "id": delivery.alert_id,
            "time": event["time"],
            "subject": event["risk_object"],
            "datacontenttype": "application/json",
            "data": event,
        }
        body = json.dumps(envelope, separators=(",", ":")).encode()
        return HttpRequest(
            self.config.url, body, {"Content-Type": "application/cloudevents+json; charset=utf-8"}
        )
