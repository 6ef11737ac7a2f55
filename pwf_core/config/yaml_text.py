"""YAML as a config's author means it: a mapping holds each key once.

PyYAML lets a later key silently replace an earlier one (``lr: 0.1`` then ``lr: 0.001``
further down runs with 0.001 and nobody is told); here a repeated key is an error naming the
key and its line. Whatever else goes wrong while reading (a bad date, nesting too deep) is a
:class:`yaml.YAMLError` too, so the one caller that turns it into a message catches one thing.
"""

from __future__ import annotations

from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping repeats a key.

    Args:
        key: The repeated key.
        line: Its 1-based line in the text.
        first_line: The line where it was first given.
    """

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"the key {key!r} on line {line} repeats the one on line {first_line}")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader says so itself below
                continue
            if first != key_node.start_mark.line + 1:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1, first)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML text with the safe loader, refusing repeated keys.

    Raises:
        yaml.YAMLError: for malformed text, a repeated key (:class:`DuplicateKeyError`), or a
            value the loader cannot build (a date that does not exist, nesting too deep).
    """
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise yaml.YAMLError(f"{type(err).__name__}: {err}") from None
