"""resolve_rules: built-in rules with the config's overrides applied, plus custom rules."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from croniter import croniter

from pathwatch.config.model import ExclusionConfig, RuleConfig
from pathwatch.rules.builtin import BUILTIN_RULES
from pathwatch.rules.model import Exclusion, Risk, Rule

_RULE_ID = re.compile(r"^[a-z0-9_]{1,64}$")


def _exclusion(cfg: ExclusionConfig, where: str) -> Exclusion:
    given = [
        (k, v)
        for k, v in (("value", cfg.value), ("glob", cfg.glob), ("regex", cfg.regex))
        if v is not None
    ]
    if not cfg.field:
        raise ValueError(f"{where}.field: required (a key field such as process.executable.path)")
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of value, glob or regex")
    kind, pattern = given[0]
    if kind == "regex":
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{where}.regex: invalid regular expression: {exc}") from exc
    return Exclusion(cfg.field, kind, pattern)


def _minutes(seconds: float, where: str) -> int:
    if seconds <= 0 or seconds % 60:
        raise ValueError(f"{where}: must be a positive whole number of minutes")
    return int(seconds // 60)


def resolve_rules(configs: Sequence[RuleConfig]) -> list[Rule]:
    """Apply `configs` to the built-ins. Raises ValueError naming `rules[i].field`."""
    rules = dict(BUILTIN_RULES)
    seen: set[str] = set()
    for i, cfg in enumerate(configs):
        where = f"rules[{i}]"
        if not _RULE_ID.match(cfg.id):
            raise ValueError(f"{where}.id: required; lower-case letters, digits and '_' only")
        if cfg.id in seen:
            raise ValueError(f"{where}.id: rule {cfg.id!r} appears twice")
        seen.add(cfg.id)
        base = rules.get(cfg.id)
        if base is None:
            if not cfg.key_fields:
                raise ValueError(
                    f"{where}.key_fields: required for a rule that is not built in "
                    f"(built-in rules: {', '.join(sorted(BUILTIN_RULES))})"
                )
            base = Rule(id=cfg.id, name=cfg.name or cfg.id, search_name=cfg.id, key_fields=())
        changes: dict[str, object] = {}
        if cfg.name is not None:
            changes["name"] = cfg.name
        if cfg.search_name is not None:
            changes["search_name"] = cfg.search_name
        if cfg.enabled is not None:
            changes["enabled"] = cfg.enabled
        if cfg.key_fields is not None:
            if not cfg.key_fields or len(set(cfg.key_fields)) != len(cfg.key_fields):
                raise ValueError(
                    f"{where}.key_fields: a non-empty list of distinct attribute names"
                )
            changes["key_fields"] = tuple(cfg.key_fields)
        if cfg.metrics is not None:
            if not cfg.metrics:
                raise ValueError(f"{where}.metrics: at least one metric name or glob")
            changes["metrics"] = tuple(cfg.metrics)
        if cfg.window is not None:
            changes["window_minutes"] = _minutes(cfg.window, f"{where}.window")
        if cfg.baseline is not None:
            changes["baseline_minutes"] = _minutes(cfg.baseline, f"{where}.baseline")
        if cfg.schedule is not None:
            if not croniter.is_valid(cfg.schedule) or len(cfg.schedule.split()) != 5:
                raise ValueError(
                    f"{where}.schedule: not a 5-field cron expression: {cfg.schedule!r}"
                )
            changes["schedule"] = cfg.schedule
        if cfg.delay is not None:
            changes["delay_seconds"] = cfg.delay
        if cfg.mode is not None:
            if cfg.mode not in ("schedule", "stream"):
                raise ValueError(f"{where}.mode: expected schedule or stream, got {cfg.mode!r}")
            changes["mode"] = cfg.mode
        if cfg.no_baseline is not None:
            if cfg.no_baseline not in ("summarize", "alert"):
                raise ValueError(
                    f"{where}.no_baseline: expected summarize or alert, got {cfg.no_baseline!r}"
                )
            changes["no_baseline"] = cfg.no_baseline
        for name, value in (
            ("learning_period", cfg.learning_period),
            ("warmup", cfg.warmup),
            ("suppress_for", cfg.suppress_for),
        ):
            if value is not None:
                if value % 60:
                    raise ValueError(f"{where}.{name}: must be a whole number of minutes")
                changes[f"{name}_minutes"] = int(value // 60)
        if cfg.exclude is not None:
            changes["exclude"] = tuple(
                _exclusion(e, f"{where}.exclude[{j}]") for j, e in enumerate(cfg.exclude)
            )
        risk = base.risk
        for name, number in (("impact", cfg.impact), ("confidence", cfg.confidence)):
            if number is not None and not 0 <= number <= 100:
                raise ValueError(f"{where}.{name}: must be between 0 and 100")
        if cfg.impact is not None:
            risk = dataclasses.replace(risk, impact=cfg.impact)
        if cfg.confidence is not None:
            risk = dataclasses.replace(risk, confidence=cfg.confidence)
        if cfg.risk_message is not None:
            risk = dataclasses.replace(risk, message=cfg.risk_message)
        if cfg.risk_object_field is not None:
            risk = dataclasses.replace(risk, object_field=cfg.risk_object_field)
        changes["risk"] = risk
        rule = dataclasses.replace(base, **changes)  # type: ignore[arg-type]
        if rule.baseline_minutes <= rule.window_minutes:
            raise ValueError(f"{where}.baseline: must be longer than the window")
        if rule.risk.object_field not in rule.key_fields:
            raise ValueError(
                f"{where}.risk_object_field: {rule.risk.object_field!r} is not a key field"
            )
        for exc in rule.exclude:
            name = "host.name" if exc.field == "host" else exc.field
            if name not in rule.key_fields:
                raise ValueError(
                    f"{where}.exclude: field {exc.field!r} is not a key field of the rule"
                )
        rules[cfg.id] = rule
    return list(rules.values())


__all__ = ["Risk", "resolve_rules"]
