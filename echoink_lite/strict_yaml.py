"""The YAML reader of recipes and `key=value` overrides: PyYAML's safe loader, made strict.

Two gaps of `yaml.safe_load` that change a run without a word:

- **Duplicate keys.** YAML says keys of a mapping are unique, but PyYAML keeps the last of two equal keys
  (yaml/constructor.py, `BaseConstructor.construct_mapping`). A second `schedule:` block pasted at the end of
  a recipe silently replaced the first, learning rate included. `load` refuses a repeated key at any level
  and names both lines. Keys merged in with `<<: *anchor` may be overridden, as YAML's merge key intends.
- **`1e-6` is a string.** PyYAML follows YAML 1.1, whose float pattern needs a dot (`1.0e-6`); YAML 1.2 and
  every other reader take `1e-6` as a number. Recipes hold numbers in strict fields (a string is not a
  learning rate), so `load` reads the YAML 1.2 forms `1e-6`, `5E3`, `1e+3` as floats too.

Nothing else changes: the same safe constructors (no Python objects), the same scalars otherwise.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A key repeated in one mapping; `line` and `first_line` are 1-based."""

    def __init__(self, key: Any, line: int, first_line: int):
        self.key, self.line, self.first_line = key, line, first_line
        super().__init__(f"line {line}: duplicate key '{key}' (first at line {first_line})")


class YamlTooDeepError(yaml.YAMLError):
    """Nesting deeper than Python's recursion allows."""


# YAML 1.2 core schema floats without a dot: [-+]?[0-9]+[eE][-+]?[0-9]+ (the dotted forms PyYAML already reads).
_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")


class StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and reads `1e-6` as a float."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise DuplicateKeyError(key, line, first)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


StrictSafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789"))


def load(text: str) -> Any:
    """`yaml.safe_load(text)` with the two fixes above. Raises yaml.YAMLError (DuplicateKeyError,
    YamlTooDeepError for nesting deeper than Python's recursion limit, or PyYAML's own errors)."""
    try:
        return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise YamlTooDeepError("nested too deeply to read (deeper than Python's recursion limit)") from None
