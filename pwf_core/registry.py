"""Methods keyed by their config class (torchao style: one frozen config → one handler).

A method's name is its config's ``method`` literal, written once: ``method: Literal["pwfn"]``.
This module imports nothing else from pwf_core, so :mod:`pwf_core.config` can look methods up
without importing them, and the method modules can import the config without a cycle.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from pwf_core.methods.base import Method


class MethodConfig(BaseModel):
    """Base of every method's config; subclasses declare ``method: Literal["<name>"]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str

    @classmethod
    def method_name(cls) -> str:
        """The name this config selects (its ``method`` literal)."""
        values = typing.get_args(cls.model_fields["method"].annotation)
        if len(values) != 1 or not isinstance(values[0], str):
            raise TypeError(f"{cls.__name__}.method must be a Literal of one name")
        return values[0]


_METHODS: dict[type[MethodConfig], type[Method]] = {}
_CONFIGS: dict[str, type[MethodConfig]] = {}

M = TypeVar("M", bound="type[Method]")


def register_method(method_class: M) -> M:
    """Class decorator: make ``method_class`` selectable by its config's ``method`` name.

    Raises:
        ValueError: when another config class already uses the same name.
    """
    config_class = method_class.config_class
    name = config_class.method_name()
    taken = _CONFIGS.get(name)
    if taken is not None and taken is not config_class:
        raise ValueError(
            f"method name '{name}' is taken by {taken.__module__}.{taken.__qualname__}"
        )
    _CONFIGS[name] = config_class
    _METHODS[config_class] = method_class
    return method_class


def method_names() -> list[str]:
    """Names of the registered methods."""
    return sorted(_CONFIGS)


def config_class(name: str) -> type[MethodConfig]:
    """The config class of the method called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in _CONFIGS:
        raise ValueError(f"unknown method '{name}'; known: {', '.join(method_names())}")
    return _CONFIGS[name]


def method_class(config: MethodConfig) -> type[Method]:
    """The method class that handles ``config``."""
    return _METHODS[type(config)]


def as_method_config(value: MethodConfig | Mapping[str, Any]) -> MethodConfig:
    """A method config from a config object or a plain mapping such as ``{"method": "pwfn"}``.

    Raises:
        ValueError: for an unknown method name or a mapping without ``method``.
        pydantic.ValidationError: for invalid knobs.
    """
    if isinstance(value, MethodConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"a method is a config object or a mapping, not {type(value).__name__}")
    if "method" not in value:
        raise ValueError(f"a method mapping needs a 'method' key, one of {method_names()}")
    return config_class(str(value["method"])).model_validate(dict(value))


def create_method(config: MethodConfig | Mapping[str, Any]) -> Method:
    """Instantiate the method a config (or mapping) names."""
    config = as_method_config(config)
    return method_class(config)(config)
