"""WebhookSink: POST of the risk event as JSON, signed per the Standard Webhooks specification.

Headers: ``webhook-id`` (the alert id, stable across retries: receivers deduplicate on it),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``: one
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` per configured secret, space-separated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence

from pathwatch.alerts.http import HttpRequest
from pathwatch.alerts.sinks._secrets import read_secret
from pathwatch.clock import Clock
from pathwatch.config.model import SinkConfig
from pathwatch.store.alertlog import Delivery

_PREFIX = "whsec_"


def decode_secret(secret: str) -> bytes:
    raw = secret.removeprefix(_PREFIX)
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("secret: expected whsec_ followed by base64") from exc
    if not key:
        raise ValueError("secret: empty key")
    return key


def sign(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode()
        for k in keys
    )


class WebhookSink:
    batch_size = 1

    def __init__(self, config: SinkConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        where = f"sinks[{config.name}].secret"
        secrets = [
            *config.secrets,
            *read_secret(config.secret, config.secret_file, config.secret_env, where),
        ]
        self._keys = []
        for s in secrets:
            try:
                self._keys.append(decode_secret(s))
            except ValueError as exc:
                raise ValueError(f"sinks[{config.name}].{exc}") from None

    def request(self, deliveries: Sequence[Delivery]) -> HttpRequest:
        (delivery,) = deliveries
        body = json.dumps(delivery.event, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "webhook-id": delivery.alert_id}
        if self._keys:
            ts = self._clock.now_ms() // 1000
            headers["webhook-timestamp"] = str(ts)
            headers["webhook-signature"] = sign(self._keys, delivery.alert_id, ts, body)
        return HttpRequest(self.config.url, body, headers)
