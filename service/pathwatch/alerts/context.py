"""Explainer: the `context` of a risk event, so a reader sees what is usual and what is not.

"python3 usually runs from /usr/bin/python3 on 47 nodes; now from /tmp/python3" is the kind of
sentence an analyst needs before deciding. Counts cover what ran before the alert's window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pathwatch.alerts.event import rfc3339
from pathwatch.alerts.suspicious import display_safe
from pathwatch.clock import MINUTE_MS
from pathwatch.engine.evaluate import Finding
from pathwatch.rules.model import CLUSTER_FIELD, HOST_FIELD, PATH_FIELD
from pathwatch.store.context import ContextIndex, ContextMemo

NAME_FIELD = "process.executable.name"


class Explainer:
    def __init__(
        self, index: ContextIndex, entity_first_seen: Callable[[str, str], int | None]
    ) -> None:
        self._index = index
        self._entities = entity_first_seen

    def explain(self, finding: Finding, memo: ContextMemo | None = None) -> dict[str, Any]:
        """The context of one alert; pass the same `memo` for all alerts of one evaluation."""
        rule, key = finding.rule, finding.key
        cluster = rule.field_value(key, CLUSTER_FIELD)
        host = rule.field_value(key, HOST_FIELD)
        path = rule.field_value(key, PATH_FIELD)
        name = rule.field_value(key, NAME_FIELD)
        if name is None and path is not None:
            name = path.rsplit("/", 1)[-1] or None
        ctx: dict[str, Any] = {}
        if cluster is not None:
            window_start = finding.tick_ms - rule.window_minutes * MINUTE_MS
            ctx = self._index.explain(cluster, host or "", path, name, window_start, memo)
        if host is not None:
            first = self._entities("h", host)
            ctx["host_first_seen"] = rfc3339(first) if first is not None else None
        usual = ctx.get("name_usual_paths")
        if usual and name is not None:
            top = usual[0]
            ctx["summary"] = (
                f"{name} usually runs from {top['path']} on {top['nodes']} node(s); now from {path}"
            )
        elif path is not None and "path_seen_on_other_nodes" in ctx:
            n = ctx["path_seen_on_other_nodes"]
            ctx["summary"] = (
                f"{path} ran on {n} other node(s) of the cluster before"
                if n
                else f"{path} never ran on another node of the cluster before"
            )
        if finding.late_history:
            ctx["earlier_history_late"] = True
            note = (
                "its earlier history arrived late (later than receiver.max_baseline_lateness "
                "after its timestamps) and is not trusted as baseline"
            )
            ctx["summary"] = f"{ctx['summary']}; {note}" if "summary" in ctx else note
        if "summary" in ctx:
            ctx["summary"] = display_safe(ctx["summary"])
        return ctx
