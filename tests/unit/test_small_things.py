"""Issue 13's small things: errors name their source, reading commands do not create a data
dir, every subcommand and option explains itself, durations read as the config writes them."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from pathwatch.app.cli import build_parser
from pathwatch.app.http import format_duration
from pathwatch.config import ConfigError, load_config


def test_a_bad_environment_value_names_the_variable() -> None:
    """A wrong value from the environment says which variable set it."""
    with pytest.raises(ConfigError) as err:
        load_config(None, {"PATHWATCH_STORE_CACHE_KEYS": "lots"})
    assert "store.cache_keys" in str(err.value)
    assert "PATHWATCH_STORE_CACHE_KEYS" in str(err.value)


def test_a_bad_file_value_names_the_file(tmp_path: Path) -> None:
    """A wrong value from the YAML file says which file."""
    path = tmp_path / "pathwatch.yaml"
    path.write_text("store:\n  cache_keys: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), {})
    assert "store.cache_keys" in str(err.value) and str(path) in str(err.value)


def test_inspect_without_a_data_dir_creates_nothing(tmp_path: Path) -> None:
    """`pathwatch inspect` with no config in an empty directory says there is no data dir and
    leaves no ./data behind."""
    proc = subprocess.run(
        [sys.executable, "-m", "pathwatch", "inspect"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_every_subcommand_and_option_has_help() -> None:
    """Each subcommand's --help page has a description and every option says what it does."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        assert command.description, name
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30 * 86400, "30d"), (3600, "1h"), (60, "1m"), (5400, "1h30m"), (0, "0s"), (0.5, "0.5s")],
)
def test_durations_read_as_the_config_writes_them(seconds: float, text: str) -> None:
    """/api/v1/rules shows 30d and 1m, not 43200m and 60.0."""
    assert format_duration(seconds) == text
