"""A config as plain data: JSON-compatible values, dotted keys for trackers, a stable hash for
cache keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """The config as plain JSON-compatible data (paths as strings, tuples as lists)."""
    return json.loads(config.model_dump_json())


def flatten_config(config: BaseModel) -> dict[str, Any]:
    """Dotted-key view of the config, e.g. ``{"compression.reg": 0.00048828125, ...}``."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", config_to_dict(config))
    return flat


def recorded_params(config: BaseModel) -> dict[str, Any]:
    """:func:`flatten_config` without the fields a section says it does not read (its
    ``unused_fields()``; e.g. ``data.img_size`` for digits): a run's parameters as a tracker
    records them, none that would suggest a setting the run never had."""
    flat = flatten_config(config)
    for name in type(config).model_fields:
        unused = getattr(getattr(config, name), "unused_fields", None)
        for field in unused() if unused is not None else ():
            flat.pop(f"{name}.{field}", None)
    return flat


def config_hash(*parts: Any) -> str:
    """Stable short hash of config sections and other JSON-able values (cache keys)."""
    canonical = json.dumps(
        [config_to_dict(p) if isinstance(p, BaseModel) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
