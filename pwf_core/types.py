"""Shared field types of the typed configs, and the rule for names that become paths.

This module imports nothing of pwf's: every config section, wherever it lives (the training
settings beside the training loop, a method's knobs in its package), builds on it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 100


class Section(BaseModel):
    """Base of every config section: unknown keys refused, values frozen, no NaN/infinity."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def check_name(name: str, what: str = "name") -> str:
    """A name that is safe as one path component: letters, digits, ``.``, ``_``, ``-``.

    Experiment and sweep names become folder names and MLflow experiment names, and a
    deployment takes them from any API caller, so ``../x``, ``/abs`` or very long names are
    refused here rather than written outside the artifacts folder.

    Raises:
        ValueError: naming what is wrong with ``name``.
    """
    if not name:
        raise ValueError(f"{what} is empty")
    if len(name) > NAME_MAX:
        raise ValueError(f"{what} is {len(name)} characters long; at most {NAME_MAX}")
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{what} '{name}' may only hold letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name
