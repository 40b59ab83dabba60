"""The documentation matches the code: examples validate, generated pages are current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from pathwatch.telemetry.docs import render
from tests.support import ROOT


def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.S)


def test_metrics_page_is_current() -> None:
    """docs/metrics.md is exactly what the metric catalogue renders (run `make docs`)."""
    assert (ROOT / "docs" / "metrics.md").read_text() == render()


def test_readme_configuration_example_is_valid(tmp_path: Path) -> None:
    """The README's full configuration example passes `pathwatch check-config`."""
    readme = (ROOT / "README.md").read_text()
    full = next(b for b in _yaml_blocks(readme) if b.startswith("data_dir:"))
    cfg = tmp_path / "pathwatch.yaml"
    cfg.write_text(full)
    env = {
        "PATH": "/usr/bin:/bin",
        "PATHWATCH_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    }
    out = subprocess.run(
        [sys.executable, "-m", "pathwatch", "check-config", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "1 enabled rule(s)" in out.stdout


def test_readme_sink_and_rule_snippets_are_valid(tmp_path: Path) -> None:
    """Every sink and rule snippet in the README is accepted by the config loader."""
    from pathwatch.config import load_config

    readme = (ROOT / "README.md").read_text()
    sinks = []
    rules = []
    for block in _yaml_blocks(readme):
        data = yaml.safe_load(block)
        if isinstance(data, list):
            sinks.extend(data)
        elif isinstance(data, dict) and "rules" in data and "data_dir" not in data:
            rules.extend(data["rules"])
    assert {s["type"] for s in sinks} == {"webhook", "splunk_hec", "alertmanager", "cloudevents"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"sinks": sinks, "rules": rules}))
    config = load_config(str(cfg), {})
    assert len(config.sinks) == 4 and any(r.exclude for r in config.rules)
