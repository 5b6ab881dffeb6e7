"""Key-path differences between two specs: `koe5 spec diff`, `koe5 diff`, the leaderboard's run page
and the resume check all show the same thing."""

from __future__ import annotations

from typing import Any

import yaml

ABSENT = "(absent)"  # the key path exists on the other side only


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{key path: leaf value}, e.g. {'a': {'b': [1, 2]}} -> {'a.b[0]': 1, 'a.b[1]': 2}. Empty mappings
    and lists are leaves, so `{}` vs `{x: 1}` shows."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def diff(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """(key path, value in a, value in b) for every leaf that differs, in a's key order then b's."""
    fa, fb = flatten(a), flatten(b)
    keys = list(fa) + [k for k in fb if k not in fa]
    return [(k, fa.get(k, ABSENT), fb.get(k, ABSENT)) for k in keys if fa.get(k, ABSENT) != fb.get(k, ABSENT)]


def diff_yaml(yaml_a: str, yaml_b: str) -> list[tuple[str, Any, Any]]:
    """`diff` of two specs stored as YAML text (raises yaml.YAMLError on damaged text)."""
    return diff(yaml.safe_load(yaml_a) or {}, yaml.safe_load(yaml_b) or {})
