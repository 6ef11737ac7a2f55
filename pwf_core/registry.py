"""Plug-ins by key: methods by their config class, compressed-file formats by their name.

torchao style: one frozen config selects one handler. A method's name is its config's
``method`` literal, written once: ``method: Literal["pwfn"]``; its package registers the method
(and, when it stores its models its own way, its file format). This module imports nothing
else from pwf_core, so everything that looks a plug-in up (the experiment config, the exporter)
sits above it and every plug-in below nothing of theirs.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict


class MethodConfig(BaseModel):
    """Base of every method's config; subclasses declare ``method: Literal["<name>"]``.

    Args:
        method: The method's name.
        include: Module-name patterns (fnmatch, e.g. ``layer*``) of the conv/linear layers to
            compress; empty: all of them. A pattern also selects the modules inside the one it
            names.
        exclude: Patterns of layers to keep in float (e.g. ``[conv1, fc]``, a timm ResNet's
            stem and classifier); they are counted apart (``ws/params_excluded``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def method_name(cls) -> str:
        """The name this config selects (its ``method`` literal)."""
        values = typing.get_args(cls.model_fields["method"].annotation)
        if len(values) != 1 or not isinstance(values[0], str):
            raise TypeError(f"{cls.__name__}.method must be a Literal of one name")
        return values[0]


class _MethodClass(Protocol):
    """What the registry needs of a method class (the class itself lives in ``methods``)."""

    config_class: type[MethodConfig]

    def __call__(self, config: Any) -> Any: ...


_METHODS: dict[type[MethodConfig], Any] = {}
_CONFIGS: dict[str, type[MethodConfig]] = {}
_DEFAULT: list[str] = []

M = TypeVar("M", bound=_MethodClass)


def register_method(method_class: M | None = None, *, default: bool = False) -> Any:
    """Class decorator: make a method selectable by its config's ``method`` name.

    ``@register_method`` or ``@register_method(default=True)`` for the method a config without
    a ``compression.method`` gets (one method is the default).

    Raises:
        ValueError: when another config class already uses the same name, or a second
            method claims to be the default.
    """

    def register(cls: M) -> M:
        config_class = cls.config_class
        name = config_class.method_name()
        taken = _CONFIGS.get(name)
        if taken is not None and taken is not config_class:
            raise ValueError(
                f"method name '{name}' is taken by {taken.__module__}.{taken.__qualname__}"
            )
        if default and _DEFAULT and _DEFAULT[0] != name:
            raise ValueError(f"'{_DEFAULT[0]}' is already the default method, not '{name}'")
        _CONFIGS[name] = config_class
        _METHODS[config_class] = cls
        if default:
            _DEFAULT[:] = [name]
        return cls

    return register if method_class is None else register(method_class)


def method_names() -> list[str]:
    """Names of the registered methods."""
    return sorted(_CONFIGS)


def default_method_name() -> str:
    """The method a config gets when it names none."""
    if not _DEFAULT:
        raise LookupError("no method is registered as the default")
    return _DEFAULT[0]


def config_class(name: str) -> type[MethodConfig]:
    """The config class of the method called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in _CONFIGS:
        raise ValueError(f"unknown method '{name}'; known: {', '.join(method_names())}")
    return _CONFIGS[name]


def method_class(config: MethodConfig) -> Any:
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


def create_method(config: MethodConfig | Mapping[str, Any]) -> Any:
    """Instantiate the method a config (or mapping) names (a :class:`pwf_core.Method`)."""
    config = as_method_config(config)
    return method_class(config)(config)


F = TypeVar("F")
_FORMATS: dict[str, Any] = {}


def register_format(name: str) -> Callable[[F], F]:
    """Class decorator: a compressed-file format, found by ``name`` when a file is loaded.

    A format class has ``claims(model) -> bool`` (whether it stores this model) and the
    methods :mod:`pwf_core.export` calls to write and read it.
    """

    def register(cls: F) -> F:
        if name in _FORMATS and _FORMATS[name] is not cls:
            raise ValueError(f"file format '{name}' is already registered")
        _FORMATS[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return register


def format_named(name: str) -> Any:
    """The file format ``name``.

    Raises:
        KeyError: for a format no registered method writes.
    """
    if name not in _FORMATS:
        raise KeyError(f"unknown file format '{name}'; known: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


def format_for(model: Any) -> Any:
    """The format that stores ``model``: the first registered one that claims it."""
    for fmt in _FORMATS.values():
        if fmt.claims(model):
            return fmt
    raise LookupError("no registered file format stores this model")
