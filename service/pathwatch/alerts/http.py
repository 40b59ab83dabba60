"""HttpPoster: one POST to a sink with TLS settings, classified once: ok, retry, permanent, gone.

Classification (the delivery contract): 2xx ok; 408, 429, 5xx, connection errors and timeouts
retry (honouring Retry-After, in seconds or as an HTTP date); 410 Gone disables the sink; any other
status is a permanent failure.
"""

from __future__ import annotations

import email.utils
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Literal

from pathwatch.clock import Clock
from pathwatch.config.model import SinkConfig

Outcome = Literal["ok", "retry", "permanent", "gone"]
_MAX_ERROR_BODY = 2048


@dataclass(frozen=True, slots=True)
class HttpRequest:
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    detail: str
    status: int | None = None
    retry_after: float | None = None


def parse_retry_after(value: str | None, now_ms: int) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now_ms / 1000)


def classify(status: int, retry_after: float | None, detail: str) -> SendResult:
    if 200 <= status < 300:
        return SendResult("ok", f"HTTP {status}", status)
    if status == 410:
        return SendResult("gone", f"HTTP 410 Gone: {detail}", status)
    if status in (408, 429) or status >= 500:
        return SendResult("retry", f"HTTP {status}: {detail}", status, retry_after)
    return SendResult("permanent", f"HTTP {status}: {detail}", status)


def _ssl_context(config: SinkConfig) -> ssl.SSLContext | None:
    if not config.url.startswith("https://"):
        return None
    ctx = ssl.create_default_context(cafile=config.ca_file)
    if config.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if config.cert_file:
        ctx.load_cert_chain(config.cert_file, config.key_file)
    return ctx


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a redirected alert could land somewhere unintended: report, don't follow


class HttpPoster:
    """Sends requests for one sink. Thread-safe. Raises nothing: every failure is a SendResult."""

    def __init__(self, config: SinkConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        ctx = _ssl_context(config)
        if ctx is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        self._opener = urllib.request.build_opener(*handlers)

    def post(self, request: HttpRequest) -> SendResult:
        req = urllib.request.Request(
            request.url,
            data=request.body,
            headers={**self._config.headers, **request.headers},
            method="POST",
        )
        try:
            with self._opener.open(req, timeout=self._config.timeout) as resp:
                resp.read(_MAX_ERROR_BODY)
                return classify(resp.status, None, "")
        except urllib.error.HTTPError as exc:
            try:
                body = exc.read(_MAX_ERROR_BODY).decode("utf-8", "replace").strip()
            except OSError:
                body = ""
            retry_after = parse_retry_after(exc.headers.get("Retry-After"), self._clock.now_ms())
            return classify(exc.code, retry_after, body or exc.reason)
        except TimeoutError:
            return SendResult("retry", f"timed out after {self._config.timeout:g}s")
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLError):
                return SendResult("retry", f"TLS error: {reason}")
            return SendResult("retry", f"connection failed: {reason}")
        except (ConnectionError, OSError) as exc:
            return SendResult("retry", f"connection failed: {exc}")
