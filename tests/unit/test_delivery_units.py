"""Delivery building blocks: Retry-After, status classes, backoff, webhook signatures, alert ids."""

from __future__ import annotations

import base64
import random
import time
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from pathwatch.alerts.dispatcher import backoff_seconds
from pathwatch.alerts.event import alert_id, parse_rfc3339, rfc3339
from pathwatch.alerts.http import classify, parse_retry_after
from pathwatch.alerts.sinks.webhook import WebhookSink, decode_secret, sign
from pathwatch.clock import FakeClock
from pathwatch.config.model import SinkConfig
from pathwatch.store.alertlog import Delivery

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=300)

NOW_MS = 1_700_000_000_000

# -- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("120", 120.0), (" 7 ", 7.0)])
def test_retry_after_seconds(value: str, seconds: float) -> None:
    """A Retry-After in seconds is honoured as given."""
    assert parse_retry_after(value, NOW_MS) == seconds


def test_retry_after_http_date_is_relative_to_now() -> None:
    """A Retry-After HTTP date means 'wait until then', measured from the given now."""
    when = datetime.fromtimestamp(NOW_MS / 1000 + 90, tz=UTC)
    header = format_datetime(when, usegmt=True)  # e.g. "Tue, 14 Nov 2023 22:14:50 GMT"
    assert parse_retry_after(header, NOW_MS) == pytest.approx(90.0)
    assert parse_retry_after(header, NOW_MS + 30_000) == pytest.approx(60.0)


def test_retry_after_date_in_the_past_means_now() -> None:
    """A Retry-After date already past means no extra wait, never a negative one."""
    past = format_datetime(datetime.fromtimestamp(NOW_MS / 1000 - 3600, tz=UTC), usegmt=True)
    assert parse_retry_after(past, NOW_MS) == 0.0


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "-5", "1.5", "12abc", "Tue, 99 Foo"])
def test_retry_after_garbage_is_ignored(value: str | None) -> None:
    """An unreadable Retry-After is ignored (normal backoff applies)."""
    assert parse_retry_after(value, NOW_MS) is None


@SETTINGS
@given(st.text(max_size=40))
@example("\u00b2")  # SUPERSCRIPT TWO: a Latin-1 header byte that str.isdigit() accepts
@example("\u0663")  # ARABIC-INDIC DIGIT THREE
def test_retry_after_never_raises(value: str) -> None:
    """Whatever a server puts in Retry-After, parsing gives a wait >= 0 or None, never an error."""
    got = parse_retry_after(value, NOW_MS)
    assert got is None or got >= 0


# -- status classes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        *[(s, "ok") for s in (200, 201, 202, 204, 299)],
        *[(s, "retry") for s in (408, 429, 500, 502, 503, 504, 599)],
        (410, "gone"),
        *[(s, "permanent") for s in (400, 401, 403, 404, 405, 409, 413, 422, 499)],
    ],
)
def test_classify(status: int, outcome: str) -> None:
    """2xx is delivered; 408, 429 and 5xx are retried; 410 disables the sink; other 4xx give up."""
    result = classify(status, 12.0, "detail")
    assert result.outcome == outcome
    assert result.status == status
    if outcome == "retry":
        assert result.retry_after == 12.0


# -- backoff ----------------------------------------------------------------------------------


@SETTINGS
@given(
    attempts=st.integers(1, 5000),
    initial=st.floats(0.01, 60),
    maximum=st.floats(0.01, 3600),
    seed=st.integers(0, 2**32),
    retry_after=st.one_of(st.none(), st.floats(0, 7200)),
)
@example(attempts=1100, initial=1.0, maximum=300.0, seed=0, retry_after=None)
def test_backoff_bounds(
    attempts: int, initial: float, maximum: float, seed: int, retry_after: float | None
) -> None:
    """Retry delays use full jitter up to the capped exponential, but never undercut Retry-After."""
    maximum = max(maximum, initial)  # config validation guarantees initial <= max
    delay = backoff_seconds(attempts, initial, maximum, random.Random(seed), retry_after)
    ceiling = min(maximum, initial * 2.0 ** min(attempts - 1, 1000))
    if retry_after is not None and retry_after > ceiling:
        assert delay >= retry_after
    else:
        assert 0 <= delay <= ceiling
        if retry_after is not None:
            assert delay >= retry_after


def test_backoff_grows_then_caps() -> None:
    """Over many draws, the largest delay doubles per attempt until the maximum."""
    rng = random.Random(7)
    highest = [
        max(backoff_seconds(n, 1.0, 10.0, rng, None) for _ in range(400)) for n in range(1, 7)
    ]
    assert highest[0] <= 1.0 and highest[1] <= 2.0 and highest[2] <= 4.0 and highest[3] <= 8.0
    assert highest[3] > 4.0 and all(h <= 10.0 for h in highest) and highest[5] > 8.0


# -- webhook signatures -----------------------------------------------------------------------

SECRET_A = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
SECRET_B = "whsec_" + base64.b64encode(b"another-secret-key").decode()


@pytest.mark.parametrize(
    "body", [b"{}", b'{"id":"x","risk_message":"caf\xc3\xa9 \xf0\x9f\x98\x80"}', b"[1,2,3]"]
)
def test_signature_verifies_with_standard_webhooks(body: bytes) -> None:
    """Receivers using the Standard Webhooks library accept pathwatch's signature."""
    ts = int(time.time())
    keys = [decode_secret(SECRET_A), decode_secret(SECRET_B)]
    headers = {
        "webhook-id": "alert-123",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(keys, "alert-123", ts, body),
    }
    Webhook(SECRET_A).verify(body, headers)
    Webhook(SECRET_B).verify(body, headers)  # every configured secret signs (rotation)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"wrong").decode()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(body + b" ", headers)


def test_webhook_sink_request_verifies() -> None:
    """A request built by the webhook sink carries headers a Standard Webhooks receiver accepts."""
    clock = FakeClock(int(time.time() * 1000))
    config = SinkConfig(
        name="soc", type="webhook", url="http://soc.example/hook", secrets=[SECRET_A]
    )
    event = {"id": "abc", "risk_score": 25, "risk_message": "new path on host n1"}
    delivery = Delivery("soc", 1, {"alert_id": "abc", "event": event})
    req = WebhookSink(config, clock).request([delivery])
    assert req.headers["webhook-id"] == "abc"
    assert Webhook(SECRET_A).verify(req.body, req.headers) == event


def test_unsigned_webhook_without_secret() -> None:
    """Without a secret the webhook is sent unsigned but still carries its id."""
    config = SinkConfig(name="soc", type="webhook", url="http://soc.example/hook")
    delivery = Delivery("soc", 1, {"alert_id": "abc", "event": {"id": "abc"}})
    req = WebhookSink(config, FakeClock()).request([delivery])
    assert req.headers["webhook-id"] == "abc"
    assert "webhook-signature" not in req.headers


# -- alert ids and times ----------------------------------------------------------------------

KEY = ("node-1", "prod", "node-1", "4242", "/tmp/x", "x")


def test_alert_id_is_deterministic() -> None:
    """The same finding always has the same alert id, so receivers can deduplicate retries."""
    a = alert_id("rule", KEY, 28_333_333)
    assert a == alert_id("rule", tuple(KEY), 28_333_333)
    assert len(a) == 32 and int(a, 16) >= 0
    assert a != alert_id("rule", KEY, 28_333_334)
    assert a != alert_id("rule2", KEY, 28_333_333)
    assert a != alert_id("rule", (*KEY[:3], "4243", *KEY[4:]), 28_333_333)


fields = st.text(st.characters(exclude_categories=("Cs",), include_characters="\x00"), max_size=6)


@SETTINGS
@given(st.lists(fields, min_size=2, max_size=2), st.lists(fields, min_size=2, max_size=2))
@example(["a\x00b", "c"], ["a", "b\x00c"])
def test_distinct_keys_have_distinct_alert_ids(a: list[str], b: list[str]) -> None:
    """Two different processes found in the same minute never share an alert id."""
    if a != b:
        assert alert_id("rule", tuple(a), 1) != alert_id("rule", tuple(b), 1)


@SETTINGS
@given(st.integers(0, 253_402_300_799_999))  # up to 9999-12-31T23:59:59.999Z
@example(0)
@example(NOW_MS + 1)
@example(NOW_MS + 999)
@example(1_089_387_406_462)  # 2004-07-09T15:36:46.462Z
def test_rfc3339_roundtrip(ms: int) -> None:
    """Times written in alerts read back to the exact millisecond."""
    text = rfc3339(ms)
    assert text.endswith("Z")
    assert parse_rfc3339(text) == ms


def test_rfc3339_format() -> None:
    """Whole seconds print without a fraction; others with exactly three digits."""
    assert rfc3339(NOW_MS) == "2023-11-14T22:13:20Z"
    assert rfc3339(NOW_MS + 5) == "2023-11-14T22:13:20.005Z"


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2023-11-14T22:13:20Z", NOW_MS),
        ("2023-11-14T22:13:20z", NOW_MS),
        ("2023-11-14T23:13:20+01:00", NOW_MS),
        ("2023-11-14T22:13:20.5Z", NOW_MS + 500),
    ],
)
def test_parse_rfc3339_offsets(text: str, ms: int) -> None:
    """Times with Z or an explicit offset are read as the same instant."""
    assert parse_rfc3339(text) == ms


@pytest.mark.parametrize("text", ["", "2023-11-14T22:13:20", "yesterday"])
def test_parse_rfc3339_refuses_ambiguous(text: str) -> None:
    """A time without an offset, or not a time, is refused."""
    with pytest.raises(ValueError):
        parse_rfc3339(text)
