"""load_config: YAML file, then PATHWATCH_* overrides, then validation naming the bad field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pathwatch.config.load import ConfigError, load_config
from pathwatch.config.model import Config
from pathwatch.rules import BUILTIN_RULES, resolve_rules
from pathwatch.rules.builtin import PARITY_RULE, PARITY_RULE_ID
from pathwatch.rules.model import Exclusion


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pathwatch.yaml"
    path.write_text(text)
    return str(path)


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env or {})
    return str(info.value)


def test_defaults_without_a_file() -> None:
    """With no file and no environment, pathwatch runs on its documented defaults."""
    config = load_config(None, {})
    assert config == Config()
    assert config.receiver.grpc.listen == "0.0.0.0:4317"
    assert config.store.fsync is True
    assert config.rules == [] and config.sinks == []


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    """An empty config file is the same as no file."""
    assert load_config(write(tmp_path, ""), {}) == Config()


def test_missing_file_is_reported(tmp_path: Path) -> None:
    """A config path that does not exist is an error naming the path."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "nope.yaml"), {})


def test_file_values_and_durations(tmp_path: Path) -> None:
    """Values from the file are used; durations and sizes accept human units."""
    config = load_config(
        write(
            tmp_path,
            "data_dir: /var/lib/pathwatch\n"
            "receiver:\n  max_future_skew: 1h30m\n  grpc:\n    max_receive_message_size: 16MiB\n"
            "store:\n  expiry_interval: 90s\n",
        ),
        {},
    )
    assert config.data_dir == "/var/lib/pathwatch"
    assert config.receiver.max_future_skew == 5400.0
    assert config.receiver.grpc.max_receive_message_size == 16 << 20
    assert config.store.expiry_interval == 90.0


def test_env_overrides_file(tmp_path: Path) -> None:
    """PATHWATCH_* environment variables override the file, with YAML-typed values."""
    path = write(tmp_path, "data_dir: /from/file\nstore:\n  fsync: true\n")
    config = load_config(
        path,
        {
            "PATHWATCH_DATA_DIR": "/from/env",
            "PATHWATCH_RECEIVER_GRPC_LISTEN": "127.0.0.1:14317",
            "PATHWATCH_STORE_FSYNC": "false",
            "PATHWATCH_CONFIG": path,  # reserved: names the file, not a setting
            "HOME": "/root",  # not ours: ignored
        },
    )
    assert config.data_dir == "/from/env"
    assert config.receiver.grpc.listen == "127.0.0.1:14317"
    assert config.store.fsync is False


def test_env_override_without_a_file() -> None:
    """Environment overrides work with no config file at all."""
    config = load_config(None, {"PATHWATCH_STORE_FSYNC": "false", "PATHWATCH_DATA_DIR": "/d"})
    assert config.store.fsync is False
    assert config.data_dir == "/d"


def test_unknown_env_var_is_named_with_suggestion() -> None:
    """A mistyped PATHWATCH_* variable is an error naming it and suggesting the right one."""
    with pytest.raises(ConfigError) as info:
        load_config(None, {"PATHWATCH_STOR_FSYNC": "false"})
    message = str(info.value)
    assert message.startswith("environment variable PATHWATCH_STOR_FSYNC")
    assert "PATHWATCH_STORE_FSYNC" in message


def test_bad_env_value_names_the_field() -> None:
    """A badly typed environment value is reported against the field it sets."""
    with pytest.raises(ConfigError, match=r"^store\.fsync: expected true or false"):
        load_config(None, {"PATHWATCH_STORE_FSYNC": "maybe"})


def test_unknown_field_with_suggestion(tmp_path: Path) -> None:
    """A misspelled key is reported with its path and the likely intended name."""
    message = error_of(tmp_path, "receiver:\n  grpc:\n    lisen: 0.0.0.0:4317\n")
    assert message.startswith("receiver.grpc.lisen: unknown field")
    assert "did you mean 'listen'?" in message
    message = error_of(tmp_path, "recevier: {}\n")
    assert message.startswith("recevier: unknown field") and "'receiver'" in message


@pytest.mark.parametrize("value", ["1 hour", "5x", "h", "-5m", "true"])
def test_bad_duration_names_the_rule_field(tmp_path: Path, value: str) -> None:
    """A duration that cannot be read is reported as rules[0].window with the bad value."""
    message = error_of(tmp_path, f"rules:\n- id: {PARITY_RULE_ID}\n  window: {value}\n")
    assert message.startswith("rules[0].window: "), message


def test_window_must_be_whole_minutes(tmp_path: Path) -> None:
    """A window that is not a whole number of minutes is refused."""
    message = error_of(tmp_path, f"rules:\n- id: {PARITY_RULE_ID}\n  window: 90s\n")
    assert message.startswith("rules[0].window: ")


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("http", "localhost"),
        ("http", ":8080"),
        ("http", "host:99999"),
        ("http", "host:http"),
        ("receiver.grpc", "0.0.0.0"),
    ],
)
def test_bad_listen_address(tmp_path: Path, where: str, value: str) -> None:
    """A listen address that is not HOST:PORT is refused, naming the setting."""
    parts = where.split(".")
    yaml_text = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parts))
    yaml_text += f"{'  ' * len(parts)}listen: '{value}'\n"
    message = error_of(tmp_path, yaml_text)
    assert message.startswith(f"{where}.listen: expected HOST:PORT"), message


def test_duplicate_sink_name(tmp_path: Path) -> None:
    """Two sinks with the same name are refused, naming the second one."""
    message = error_of(
        tmp_path,
        "sinks:\n"
        "- {name: soc, type: webhook, url: 'http://a.example/hook'}\n"
        "- {name: soc, type: webhook, url: 'http://b.example/hook'}\n",
    )
    assert message.startswith("sinks[1].name: ") and "'soc'" in message


def test_bad_sink_type(tmp_path: Path) -> None:
    """An unsupported sink type is refused and the supported ones are listed."""
    message = error_of(tmp_path, "sinks:\n- {name: s, type: slack, url: 'http://x.example'}\n")
    assert message.startswith("sinks[0].type: ")
    for kind in ("webhook", "splunk_hec", "alertmanager", "cloudevents"):
        assert kind in message


def test_builtin_rule_override_is_applied(tmp_path: Path) -> None:
    """Overriding the built-in rule changes only the fields given."""
    config = load_config(
        write(
            tmp_path,
            f"rules:\n- id: {PARITY_RULE_ID}\n  enabled: false\n  window: 2h\n"
            "  exclude:\n  - field: process.executable.path\n    glob: '/usr/*'\n",
        ),
        {},
    )
    (rule,) = (r for r in resolve_rules(config.rules) if r.id == PARITY_RULE_ID)
    assert rule.enabled is False
    assert rule.window_minutes == 120
    assert rule.exclude == (Exclusion("process.executable.path", "glob", "/usr/*"),)
    assert rule.baseline_minutes == PARITY_RULE.baseline_minutes
    assert rule.key_fields == PARITY_RULE.key_fields
    assert rule.schedule == PARITY_RULE.schedule
    assert rule.risk == PARITY_RULE.risk


def test_custom_rule_without_key_fields(tmp_path: Path) -> None:
    """A new rule must say which attributes make its key."""
    message = error_of(tmp_path, "rules:\n- id: my_rule\n  window: 1h\n")
    assert message.startswith("rules[0].key_fields: ")


def test_custom_rule_is_added(tmp_path: Path) -> None:
    """A custom rule with key fields is added next to the built-in one."""
    config = load_config(
        write(
            tmp_path,
            "rules:\n- id: node_paths\n  key_fields: [host.name, process.executable.path]\n"
            "  window: 10m\n  baseline: 7d\n  schedule: '*/10 * * * *'\n",
        ),
        {},
    )
    rules = {r.id: r for r in resolve_rules(config.rules)}
    assert set(rules) == {*BUILTIN_RULES, "node_paths"}
    custom = rules["node_paths"]
    assert custom.key_fields == ("host.name", "process.executable.path")
    assert (custom.window_minutes, custom.baseline_minutes) == (10, 7 * 24 * 60)


@pytest.mark.parametrize(("window", "baseline"), [("1h", "1h"), ("2h", "1h"), ("31d", None)])
def test_baseline_must_exceed_window(tmp_path: Path, window: str, baseline: str | None) -> None:
    """A baseline not longer than the window is refused."""
    text = f"rules:\n- id: {PARITY_RULE_ID}\n  window: {window}\n"
    if baseline:
        text += f"  baseline: {baseline}\n"
    assert error_of(tmp_path, text).startswith("rules[0].baseline: ")


@pytest.mark.parametrize("cron", ["0 * * *", "61 * * * *", "every hour", "0 * * * * *"])
def test_invalid_cron(tmp_path: Path, cron: str) -> None:
    """A schedule that is not a 5-field cron expression is refused."""
    message = error_of(tmp_path, f"rules:\n- id: {PARITY_RULE_ID}\n  schedule: '{cron}'\n")
    assert message.startswith("rules[0].schedule: ")


def test_invalid_regex(tmp_path: Path) -> None:
    """An exclusion regex that does not compile is refused, naming the exclusion."""
    message = error_of(
        tmp_path,
        f"rules:\n- id: {PARITY_RULE_ID}\n  exclude:\n"
        "  - field: process.executable.path\n    regex: '(['\n",
    )
    assert re.match(r"rules\[0\]\.exclude\[0\]\.regex: ", message), message


def test_exclusion_on_unknown_field(tmp_path: Path) -> None:
    """An exclusion on an attribute that is not part of the rule's key is refused."""
    message = error_of(
        tmp_path,
        f"rules:\n- id: {PARITY_RULE_ID}\n  exclude:\n  - field: process.owner\n    value: root\n",
    )
    assert message.startswith("rules[0].exclude")
