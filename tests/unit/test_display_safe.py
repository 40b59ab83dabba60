"""Prose built for people (risk_message, context summaries) cannot be rewritten by a crafted
path; the alert's fields keep the exact value."""

from __future__ import annotations

from pathwatch.alerts.event import risk_event
from pathwatch.alerts.suspicious import display_safe, most_suspicious_first, suspicion
from pathwatch.engine.evaluate import Finding
from pathwatch.rules.builtin import PARITY_RULE
from pathwatch.store.codec import KeyState
from pathwatch.store.presence import PresenceHistory

TICK = 1_800_000_000_000 - 1_800_000_000_000 % 3_600_000


def _event(host: str, path: str) -> dict[str, object]:
    key = (host, "prod", host, "1", path, path.rsplit("/", 1)[-1])
    state = KeyState(
        TICK - 60_000, TICK - 60_000, PresenceHistory(((TICK // 60_000 - 1, TICK // 60_000),))
    )
    return risk_event(Finding(PARITY_RULE, TICK, key, state, TICK // 60_000 - 1)).body


def test_bidi_override_and_control_characters_are_escaped_in_the_message() -> None:
    """A host name with a right-to-left override or a terminal escape is shown escaped in the
    message; `fields` keep the exact value."""
    host = "node-1\u202e\x1b[2Jevil"
    body = _event(host, "/usr/bin/x")
    assert "\u202e" not in str(body["risk_message"]) and "\x1b" not in str(body["risk_message"])
    assert "\\u202e" in str(body["risk_message"]) and "\\x1b" in str(body["risk_message"])
    assert body["fields"]["host"] == host  # type: ignore[index]


def test_invalid_utf8_is_named_in_the_alert() -> None:
    """A key field that held bytes that are not UTF-8 (kept as \\xNN) is named in the alert."""
    body = _event("node-1", "/tmp/\\xff\\xfe/implant")
    assert body["invalid_utf8_fields"] == ["process.executable.path"]
    assert "invalid_utf8_fields" not in _event("node-1", "/usr/bin/ok")


def test_suspicious_locations_rank_first() -> None:
    """Drop sites, hidden directories and deleted binaries come before ordinary paths."""
    paths = ["/usr/bin/a", "/opt/.cache/b", "/tmp/.x/c", "/usr/sbin/d (deleted)", "/dev/shm/e"]
    ranked = most_suspicious_first(paths, str, 10)
    assert ranked[0] == "/tmp/.x/c"
    assert ranked[-1] == "/usr/bin/a"
    assert suspicion("/usr/bin/a") == 3
    assert display_safe("plain /usr/bin/a") == "plain /usr/bin/a"
