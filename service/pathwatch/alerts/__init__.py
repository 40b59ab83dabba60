"""Alerts: the risk event, the sinks, and the dispatcher that drains the durable outbox."""

from pathwatch.alerts.dispatcher import Dispatcher, SinkStatus, backoff_seconds
from pathwatch.alerts.event import RiskEvent, alert_id, parse_rfc3339, rfc3339, risk_event

__all__ = [
    "Dispatcher",
    "RiskEvent",
    "SinkStatus",
    "alert_id",
    "backoff_seconds",
    "parse_rfc3339",
    "rfc3339",
    "risk_event",
]
