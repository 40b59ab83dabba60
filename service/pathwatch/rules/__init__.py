"""Rules: what a detection is (key fields, metric globs, windows, schedule, risk, exclusions)."""

from pathwatch.rules.builtin import BUILTIN_RULES, PARITY_RULE_ID
from pathwatch.rules.model import Exclusion, Risk, Rule
from pathwatch.rules.resolve import resolve_rules

__all__ = ["BUILTIN_RULES", "PARITY_RULE_ID", "Exclusion", "Risk", "Rule", "resolve_rules"]
