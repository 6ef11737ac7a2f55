"""The one typed experiment config, validated at the edge.

:mod:`~pwf_core.config.schema` composes :class:`ExperimentConfig` from the sections the
library's pieces define; :mod:`~pwf_core.config.overrides` applies dotted-key overrides;
:mod:`~pwf_core.config.files` reads and writes YAML; :mod:`~pwf_core.config.serialise` turns a
config into plain data, dotted keys and a hash. Bad values fail with :class:`ConfigError`,
whose message names each offending field.
"""

from pwf_core.config.files import dump_config, load_config, read_yaml
from pwf_core.config.overrides import apply_overrides, parse_override_strings
from pwf_core.config.schema import (
    EvalConfig,
    ExecutionConfig,
    ExperimentConfig,
    parse_config,
)
from pwf_core.config.serialise import (
    config_hash,
    config_to_dict,
    flatten_config,
    recorded_params,
)
from pwf_core.data import DataConfig
from pwf_core.errors import ConfigError
from pwf_core.models import ModelConfig
from pwf_core.train import OptimConfig, PretrainConfig, TrainConfig
from pwf_core.types import check_name

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExecutionConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "TrainConfig",
    "apply_overrides",
    "check_name",
    "config_hash",
    "config_to_dict",
    "dump_config",
    "flatten_config",
    "load_config",
    "parse_config",
    "parse_override_strings",
    "read_yaml",
    "recorded_params",
]
