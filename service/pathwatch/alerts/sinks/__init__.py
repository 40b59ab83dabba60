"""Sinks: one module per destination type; each turns deliveries into one HTTP request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pathwatch.alerts.http import HttpRequest
from pathwatch.clock import Clock
from pathwatch.config.model import SinkConfig
from pathwatch.store.alertlog import Delivery


class Sink(Protocol):
    config: SinkConfig
    batch_size: int

    def request(self, deliveries: Sequence[Delivery]) -> HttpRequest:
        """The HTTP request that delivers `deliveries` (at most `batch_size` of them)."""
        ...


def build_sink(config: SinkConfig, clock: Clock) -> Sink:
    """Raises ValueError naming the field when the sink's settings are unusable."""
    from pathwatch.alerts.sinks.alertmanager import AlertmanagerSink
    from pathwatch.alerts.sinks.cloudevents import CloudEventsSink
    from pathwatch.alerts.sinks.splunk_hec import SplunkHecSink
    from pathwatch.alerts.sinks.webhook import WebhookSink

    types: dict[str, type] = {
        "webhook": WebhookSink,
        "splunk_hec": SplunkHecSink,
        "alertmanager": AlertmanagerSink,
        "cloudevents": CloudEventsSink,
    }
    sink: Sink = types[config.type](config, clock)
    return sink


__all__ = ["Sink", "build_sink"]
