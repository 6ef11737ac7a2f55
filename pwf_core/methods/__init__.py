"""Fixing methods, one file each, selected by ``fixing.method`` through a registry.

Adding a method: write ``methods/<name>.py`` with a config (a :class:`FixingConfig` subclass)
and a :class:`FixingMethod` subclass decorated with ``@register_method("<name>")``, then import
the module below.
"""

from pwf_core.methods import kmeans, pwfn, uniform, wfn
from pwf_core.methods.base import (
    FixingMethod,
    FlatWeights,
    create_method,
    fixed_target,
    method_config_class,
    method_names,
    register_method,
)

__all__ = [
    "FixingMethod",
    "FlatWeights",
    "create_method",
    "fixed_target",
    "kmeans",
    "method_config_class",
    "method_names",
    "pwfn",
    "register_method",
    "uniform",
    "wfn",
]
