"""Configuration: one YAML file, environment overrides, validated once at start."""

from pathwatch.config.load import ConfigError, load_config
from pathwatch.config.model import (
    Config,
    ExclusionConfig,
    RetryConfig,
    RuleConfig,
    SinkConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "ExclusionConfig",
    "RetryConfig",
    "RuleConfig",
    "SinkConfig",
    "load_config",
]
