"""Scheduler: runs each enabled rule at its cron ticks (UTC), catches up after downtime."""

from pathwatch.scheduler.runner import TickOutcome, TickRunner
from pathwatch.scheduler.scheduler import Scheduler, due_ticks

__all__ = ["Scheduler", "TickOutcome", "TickRunner", "due_ticks"]
