"""Configs on disk: YAML read with a clear error for every way a file can be wrong, and
written back so that it reads to an equal config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pwf_core.config.overrides import apply_overrides
from pwf_core.config.schema import ExperimentConfig, parse_config
from pwf_core.config.serialise import config_to_dict
from pwf_core.config.yaml_text import DuplicateKeyError, load_yaml
from pwf_core.errors import ConfigError


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML mapping from ``path``, with a clear error when it is missing or malformed.

    Raises:
        ConfigError: for a missing, unreadable, non-UTF-8, empty or malformed file, or one
            that does not hold a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} '{path}' is a folder; name a YAML file in it")
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{what} '{path}' is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} '{path}': {err.strerror}") from None
    try:
        values = load_yaml(text)
    except DuplicateKeyError as err:
        raise ConfigError(
            f"{what} '{path}': {err}; a mapping holds each key once (which one did you mean?)"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {err}") from None
    if values is None:
        raise ConfigError(f"{what} '{path}' is empty")
    if not isinstance(values, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping at the top level")
    return values


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """Load and validate an experiment config.

    Args:
        path: YAML file; ``None`` gives the built-in defaults (digits + small CNN + PWFN).
        overrides: Dotted keys to replace, e.g. ``{"compression.reg": 0.001}``.

    Raises:
        ConfigError: for a missing file, bad YAML or any invalid field.
    """
    values = read_yaml(path) if path is not None else {}
    if overrides:
        values = apply_overrides(values, overrides)
    return parse_config(values)


def dump_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the config as YAML that :func:`load_config` reads back to an equal config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
