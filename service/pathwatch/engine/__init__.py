"""Engine: evaluates a rule at a tick over the store's presence histories (pure logic)."""

from pathwatch.engine.evaluate import (
    Evaluation,
    Finding,
    PresenceReader,
    evaluate,
    late_findings,
)

__all__ = ["Evaluation", "Finding", "PresenceReader", "evaluate", "late_findings"]
