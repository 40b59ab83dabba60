"""App: wiring and lifecycle of the pipeline, the admin HTTP API and the command line."""

from pathwatch.app.service import Service

__all__ = ["Service"]
