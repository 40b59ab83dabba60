"""Loading: YAML file -> environment overrides -> typed, validated Config.

Every error is a ConfigError whose message starts with the field's path
(``sinks[0].retry.max_age: ...``), so `pathwatch check-config` can say exactly what to fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from pathwatch.config.model import SINK_TYPES, ByteSize, Config, Duration

ENV_PREFIX = "PATHWATCH_"
# Read by the CLI and the receiver (decode.PURE_PYTHON_ENV), not settings.
ENV_RESERVED = {"PATHWATCH_CONFIG", "PATHWATCH_API_TOKEN", "PATHWATCH_PURE_PYTHON"}

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
    "KB": 10**3, "MB": 10**6, "GB": 10**9,
}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_RECEIVER_PROCESSES = 64


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and the problem."""


def parse_duration(value: object, where: str = "duration") -> float:
    """Seconds from "90s", "5m", "1h30m", "30d" or a plain number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration like 5m, 1h or 30d, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or pos == 0:
            raise ConfigError(f"{where}: expected a duration like 5m, 1h or 30d, got {value!r}")
    else:
        raise ConfigError(f"{where}: expected a duration like 5m, 1h or 30d, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{where}: must not be negative, got {value!r}")
    return seconds


def _parse_size(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ConfigError(f"{where}: expected a size like 64MiB or a number of bytes, got {value!r}")


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if hint is Duration:
        return parse_duration(value, where)
    if hint is ByteSize:
        return _parse_size(value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(str, v, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {hint!r}")  # pragma: no cover


def _build(cls: Any, value: Any, where: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, raw in value.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown field{hint}")
        kwargs[key] = _convert(hints[key], raw, path)
    return cls(**kwargs)


def _env_paths(cls: Any, prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Environment variable name -> field path, for every scalar field outside lists."""
    out: dict[str, tuple[str, ...]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(hint):
            out.update(_env_paths(hint, path))
        elif typing.get_origin(hint) not in (list, dict):
            out[ENV_PREFIX + "_".join(path).upper()] = path
    return out


def env_variables() -> list[str]:
    """Every supported PATHWATCH_* override, for the docs and `--help`."""
    return sorted(_env_paths(Config))


def _apply_env(
    raw: dict[str, Any], env: Mapping[str, str], applied: dict[str, str] | None = None
) -> list[str]:
    """Apply overrides; returns the PATHWATCH_* names that are not settings. `applied` gets,
    per field path (``receiver.grpc.listen``), the variable that set it."""
    paths = _env_paths(Config)
    unknown = []
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        path = paths.get(name)
        if path is None:
            unknown.append(name)
            continue
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        try:
            node[path[-1]] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            node[path[-1]] = text
        if applied is not None:
            applied[".".join(path)] = name
    return unknown


def _check_unknown_env(config: Config, unknown: list[str]) -> None:
    """A PATHWATCH_* variable that is neither a setting nor a secret the config names is
    almost always a typo: say so instead of silently ignoring it."""
    referenced = {n for s in config.sinks for n in (s.secret_env, s.token_env) if n}
    referenced |= {
        n
        for n in (config.receiver.grpc.auth.bearer_token_env, config.http.auth.bearer_token_env)
        if n
    }
    for name in sorted(set(unknown) - referenced):
        close = difflib.get_close_matches(name, list(_env_paths(Config)), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(
            f"environment variable {name}: not a known setting nor named by a *_env setting{hint}"
        )


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate. Raises ConfigError naming the field and the problem."""
    raw: Any = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
    from_env: dict[str, str] = {}
    unknown = _apply_env(raw, env or {}, from_env)
    try:
        config: Config = _build(Config, raw, "")
        _check_unknown_env(config, unknown)
        validate(config)
    except ConfigError as exc:
        raise ConfigError(_with_source(str(exc), from_env, path)) from None
    return config


def _with_source(message: str, from_env: Mapping[str, str], path: str | None) -> str:
    """The message with where the bad value came from: the environment variable that set the
    field, else the config file (defaults cannot be wrong)."""
    field_path = message.split(":", 1)[0]
    if field_path in from_env:
        return f"{message} (set by environment variable {from_env[field_path]})"
    if path and not message.startswith((path, "environment variable")):
        return f"{message} (in {path})"
    return message


def validate(config: Config) -> None:
    """Checks that span fields or need more than a type. Rules are checked when resolved."""
    from pathwatch.rules import resolve_rules

    for i, field_name in ((0, "receiver.grpc.listen"), (1, "http.listen")):
        listen = config.receiver.grpc.listen if i == 0 else config.http.listen
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{field_name}: expected HOST:PORT, got {listen!r}")
    if config.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"log.level: expected debug, info, warning or error, got {config.log.level!r}"
        )
    if config.log.format not in ("auto", "json", "console"):
        raise ConfigError(f"log.format: expected auto, json or console, got {config.log.format!r}")
    if config.receiver.grpc.max_receive_message_size < 1 << 20:
        raise ConfigError("receiver.grpc.max_receive_message_size: must be at least 1MiB")
    http_receiver = config.receiver.http
    if http_receiver.listen:
        host, sep, port = http_receiver.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(
                f"receiver.http.listen: expected HOST:PORT (or empty: off), "
                f"got {http_receiver.listen!r}"
            )
    if http_receiver.max_receive_message_size < 1 << 20:
        raise ConfigError("receiver.http.max_receive_message_size: must be at least 1MiB")
    if http_receiver.max_concurrent_requests < 1:
        raise ConfigError("receiver.http.max_concurrent_requests: must be at least 1")
    if http_receiver.max_concurrent_json_decodes < 1:
        raise ConfigError("receiver.http.max_concurrent_json_decodes: must be at least 1")
    if http_receiver.read_timeout <= 0:
        raise ConfigError("receiver.http.read_timeout: must be positive")
    if config.http.read_timeout <= 0:
        raise ConfigError("http.read_timeout: must be positive")
    if config.http.max_concurrent_requests < 1:
        raise ConfigError("http.max_concurrent_requests: must be at least 1")
    if not 1 <= config.receiver.grpc.processes <= MAX_RECEIVER_PROCESSES:
        raise ConfigError(
            f"receiver.grpc.processes: must be 1 (the service process serves gRPC itself) to "
            f"{MAX_RECEIVER_PROCESSES}, got {config.receiver.grpc.processes}"
        )
    if config.receiver.grpc.max_concurrent_streams < 1:
        raise ConfigError("receiver.grpc.max_concurrent_streams: must be at least 1")
    for where, tls in (
        ("receiver.grpc.tls", config.receiver.grpc.tls),
        ("receiver.http.tls", config.receiver.http.tls),
    ):
        if tls.require_host_match and not tls.client_ca_file:
            raise ConfigError(
                f"{where}.require_host_match: needs {where}.client_ca_file (mTLS): the host "
                "name is checked against the client certificate"
            )
    if config.store.max_pending_keys < 1:
        raise ConfigError("store.max_pending_keys: must be at least 1")
    for name in (
        "new_keys_per_host_per_hour",
        "new_keys_per_sender_per_hour",
        "new_keys_per_hour",
        "max_alerts_per_tick",
    ):
        if getattr(config.limits, name) < 0:
            raise ConfigError(f"limits.{name}: must be 0 (off) or positive")
    for i, pattern in enumerate(config.shard.clusters):
        if not pattern.strip():
            raise ConfigError(f"shard.clusters[{i}]: must not be empty (a name or a glob)")
    if not config.data_dir:
        raise ConfigError("data_dir: must not be empty")
    names: set[str] = set()
    for i, sink in enumerate(config.sinks):
        where = f"sinks[{i}]"
        if not _NAME.match(sink.name):
            raise ConfigError(f"{where}.name: required; letters, digits, '_', '-', '.' only")
        if sink.name in names:
            raise ConfigError(f"{where}.name: {sink.name!r} is used by another sink")
        names.add(sink.name)
        if sink.type not in SINK_TYPES:
            raise ConfigError(
                f"{where}.type: expected one of {', '.join(SINK_TYPES)}, got {sink.type!r}"
            )
        if not sink.url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.url: expected an http:// or https:// URL, got {sink.url!r}")
        if sink.timeout <= 0:
            raise ConfigError(f"{where}.timeout: must be positive")
        if sink.retry.initial_backoff <= 0 or sink.retry.max_backoff < sink.retry.initial_backoff:
            raise ConfigError(f"{where}.retry: need 0 < initial_backoff <= max_backoff")
        if sink.max_concurrency < 1:
            raise ConfigError(f"{where}.max_concurrency: must be at least 1")
    try:
        resolve_rules(config.rules)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
