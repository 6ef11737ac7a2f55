"""Dotted-key overrides of a config: ``compression.reg=0.001`` on the command line, a sweep's
fixed overrides and its trials' parameters."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from pwf_core.config.schema import LEGACY_SECTION, SECTION, renamed_legacy
from pwf_core.config.yaml_text import load_yaml
from pwf_core.errors import ConfigError
from pwf_core.registry import default_method_name


def _merge(node: dict[str, Any], key: str, value: Any) -> None:
    """Set ``node[key]``; a mapping merges into an existing section instead of replacing it."""
    current = node.get(key)
    if isinstance(value, Mapping) and isinstance(current, dict):
        for child_key, child_value in value.items():
            _merge(current, str(child_key), child_value)
    else:
        node[key] = copy.deepcopy(value)


def _asked_method(parts: list[str], value: Any) -> Any:
    """The method an override asks for, if it names one."""
    if parts == [SECTION, "method"]:
        return value
    if parts == [SECTION] and isinstance(value, Mapping):
        return value.get("method")
    return None


def apply_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``values`` with dotted-key overrides (``compression.reg: 0.001``) applied.

    A mapping value merges into the section it names (``pretrain: {epochs: 1}`` changes only
    ``pretrain.epochs``). A different ``compression.method`` resets the section to that
    method's defaults first: the old method's knobs (and its schedule) are not the new one's.

    Raises:
        ConfigError: when a dotted key runs through a value that is not a section.
    """
    merged = renamed_legacy(json.loads(json.dumps(dict(values), default=str)))
    named = [(dotted.split("."), value) for dotted, value in overrides.items()]
    for parts, _ in named:
        if parts[0] == LEGACY_SECTION:
            parts[0] = SECTION
    # Method switches first, so that knobs given beside one apply to the new method.
    named.sort(key=lambda item: _asked_method(*item) is None)
    for parts, value in named:
        asked = _asked_method(parts, value)
        section = merged.get(SECTION)
        current = None
        if isinstance(section, dict):
            current = section.get("method", default_method_name())
        if asked is not None and asked != current:
            merged[SECTION] = {"method": asked}
        node = merged
        *parents, leaf = parts
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                dotted = ".".join(parts)
                raise ConfigError(f"invalid override '{dotted}': '{part}' is not a section")
            node = child
        _merge(node, leaf, value)
    return merged


def _finite(value: Any, key: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"override '{key}': {value} is not a finite number")
    if isinstance(value, Mapping):
        for child in value.values():
            _finite(child, key)
    if isinstance(value, list):
        for child in value:
            _finite(child, key)
    return value


def parse_override_strings(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings (values as YAML) into a dotted-key mapping.

    Raises:
        ConfigError: for an item without ``=``, a value that is not YAML, or NaN/infinity.
    """
    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form section.field=value")
        try:
            value = load_yaml(text)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(
                f"override '{item}': the value is not valid YAML ({problem})"
            ) from None
        parsed[key] = _finite(value, key)
    return parsed
