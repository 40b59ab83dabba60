"""Key search shared by `pathwatch inspect` and GET /api/v1/keys: a full scan, for operators."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import Any

from pathwatch.alerts.event import rfc3339
from pathwatch.rules.model import Rule
from pathwatch.store.codec import KeyState
from pathwatch.store.firstseen import FirstSeenStore

PATH_FIELD = "process.executable.path"
NAME_FIELD = "process.executable.name"


def key_view(rule: Rule, key: tuple[str, ...], state: KeyState) -> dict[str, Any]:
    return {
        "rule": rule.id,
        "key": dict(zip(rule.key_fields, key, strict=True)),
        "first_seen": rfc3339(state.first_seen_ms),
        "last_seen": rfc3339(state.last_seen_ms),
        "presence": [[rfc3339(s * 60_000), rfc3339(e * 60_000)] for s, e in state.history.runs],
    }


def search_keys(
    store: FirstSeenStore, rule: Rule, path: str | None, name: str | None
) -> Iterator[dict[str, Any]]:
    """Keys of `rule` whose executable path / name match the globs (None matches all)."""
    index = {f: i for i, f in enumerate(rule.key_fields)}
    for field, glob in ((PATH_FIELD, path), (NAME_FIELD, name)):
        if glob is not None and field not in index:
            raise ValueError(f"rule {rule.id} has no key field {field}")
    for key, state in store.scan(rule.id):
        if path is not None and not fnmatch.fnmatchcase(key[index[PATH_FIELD]], path):
            continue
        if name is not None and not fnmatch.fnmatchcase(key[index[NAME_FIELD]], name):
            continue
        yield key_view(rule, key, state)
