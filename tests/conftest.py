"""Shared fixtures: temp data dirs, the real service in a subprocess, real HTTP sinks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import HttpSink, ServiceProcess


@pytest.fixture
def sink() -> Iterator[HttpSink]:
    s = HttpSink()
    yield s
    s.close()


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[type[ServiceProcess]]:
    started: list[ServiceProcess] = []

    class Factory(ServiceProcess):
        def start(self, timeout: float = 30.0) -> ServiceProcess:
            started.append(self)
            return super().start(timeout)

    yield Factory
    for svc in started:
        svc.kill()
