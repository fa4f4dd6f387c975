"""Config models (pydantic) and the YAML configs shipped with mapgap."""

from mapgap.conf.schema import ConfigError, PipelineConfig, load_config, validate_config

__all__ = ["ConfigError", "PipelineConfig", "load_config", "validate_config"]
