"""The errors pwf raises for what a user can fix: a config, a file, a dataset.

This module imports nothing of pwf's, so every floor of the library can raise them and every
caller (the ``pwf`` command turns each into one line) can catch them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending field."""


class CheckpointError(RuntimeError):
    """A tensor file that is missing, unreadable or does not fit the model."""


class DatasetError(RuntimeError):
    """A dataset path that is missing or whose files are malformed."""


class CompressedFileError(CheckpointError):
    """A compressed model file that is truncated, corrupted, or written by a newer pwf."""


class NotCompressedError(ValueError):
    """A model asked to be stored or exported compressed that is not: never converted, or
    some converted weight still free."""
