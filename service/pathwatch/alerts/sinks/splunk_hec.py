"""SplunkHecSink: batches of risk events to Splunk's HTTP Event Collector.

Each event is wrapped in the HEC envelope {time, host, source, sourcetype, index, event}; a batch
is the envelopes concatenated, as HEC accepts. HEC answers with HTTP statuses that the common
classification already maps right: 400 (bad data) and 401/403 (token) permanent, 503 (busy) retry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pathwatch.alerts.event import parse_rfc3339
from pathwatch.alerts.http import HttpRequest
from pathwatch.alerts.sinks._secrets import read_secret
from pathwatch.clock import Clock
from pathwatch.config.model import SinkConfig
from pathwatch.store.alertlog import Delivery

_EVENT_PATH = "/services/collector/event"


def hec_url(url: str) -> str:
    base = url.rstrip("/")
    if base.endswith(_EVENT_PATH):
        return base
    if base.endswith("/services/collector"):
        return base + "/event"
    return base + _EVENT_PATH


class SplunkHecSink:
    def __init__(self, config: SinkConfig, clock: Clock) -> None:
        self.config = config
        self.batch_size = max(1, config.batch_size)
        tokens = read_secret(
            config.token, config.token_file, config.token_env, f"sinks[{config.name}].token"
        )
        if not tokens:
            raise ValueError(
                f"sinks[{config.name}].token: splunk_hec needs token, token_file or token_env"
            )
        self._token = tokens[0]
        self._url = hec_url(config.url)

    def request(self, deliveries: Sequence[Delivery]) -> HttpRequest:
        lines = []
        for d in deliveries:
            event = d.event
            lines.append(
                json.dumps(
                    {
                        "time": parse_rfc3339(event["time"]) / 1000,
                        "host": event["risk_object"],
                        "source": event["rule"]["search_name"],
                        "sourcetype": self.config.sourcetype,
                        "index": self.config.index,
                        "event": event,
                    },
                    separators=(",", ":"),
                )
            )
        headers = {"Authorization": f"Splunk {self._token}", "Content-Type": "application/json"}
        return HttpRequest(self._url, "\n".join(lines).encode(), headers)
