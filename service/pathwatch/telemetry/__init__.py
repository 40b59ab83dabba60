"""Telemetry: the catalogue of Prometheus metrics and the logging set-up."""
