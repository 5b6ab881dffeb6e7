"""Reading and writing spec YAML, remembering where every key came from.

PyYAML alone loses line numbers, silently keeps the last of two duplicate keys, and reads `2e-5` as a
string (YAML 1.1 wants `2.0e-5`). This module fixes all three, so errors can say `file:line` and a
learning rate written the way everyone writes it is a number.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from koe5.spec.errors import SpecError, join_path


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.2 floats: `2e-5`, `1E3` without a dot. Registered for the characters a number can start with.
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, str]]:
    """(value, positions): positions maps each key path to 'source:line'. Raises SpecError on bad YAML."""
    positions: dict[str, str] = {}
    errors: list[tuple[str, str]] = []
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        value = _construct(loader, node, "", source, positions, errors) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = e.problem or "invalid YAML"
        if e.context and e.context_mark:  # where the unfinished construct began, e.g. an unclosed bracket
            cm = e.context_mark
            problem += f" ({e.context} at {source}:{cm.line + 1}:{cm.column + 1})"
        raise SpecError([("", f"{where}: YAML syntax error: {problem}. Check indentation, colons and quotes "
                              "around that spot.")], source) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, e.g. NUL
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise SpecError([("", f"{source}:{line}:{column}: character U+{e.character:04X} is not allowed in YAML; "
                              "delete it")], source) from None
    except yaml.YAMLError as e:
        raise SpecError([("", f"{source}: YAML error: {e}")], source) from None
    finally:
        if loader is not None:
            loader.dispose()
    if errors:
        raise SpecError(errors, source)
    return value, positions


def _construct(loader, node, path, source, positions, errors, key_node=None):
    # A key's position is the line of the key itself, not of the value below it.
    here = f"{source}:{(key_node or node).start_mark.line + 1}"
    if path:
        positions[path] = here
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys (`<<: *anchor`)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                errors.append((path, f"{here}: a key must be a plain word, found {key!r}"))
                continue
            key_path = join_path(path, str(key))
            if key in out:
                errors.append((key_path, f"{source}:{key_node.start_mark.line + 1}: duplicate key; "
                                         f"it is already set at {positions.get(key_path, 'above')}. Keep one."))
                continue
            out[key] = _construct(loader, value_node, key_path, source, positions, errors, key_node)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, item, join_path(path, i), source, positions, errors)
                for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load_yaml_file(path: Path) -> tuple[Any, dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([("", f"{path}: no such file")], path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([("", f"{path}: cannot read spec file ({e})")], path) from None
    return parse_yaml(text, str(path))


def parse_value(text: str) -> Any:
    """A command-line value, typed the way YAML would type it (`2` is an int, `[1,2]` a list);
    text that is not valid YAML stays text."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
