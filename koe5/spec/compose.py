"""Composing one raw spec dict: `base:` inheritance, `key=value` overrides and `${...}` interpolation.

The result is still untyped; validate.py checks it against the schema. Alongside the dict we keep an
origin for every key path (which file and line set it, or which override), so an error can point at
the line to fix and a relative path can be resolved against the file that wrote it.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from koe5.spec import introspect, schema
from koe5.spec.errors import SpecError, did_you_mean, join_path
from koe5.spec.yamlio import load_yaml_file, parse_value


FROZEN_MARK = "koe5_frozen_spec"  # top-level key of a file written by ResolvedSpec.freeze()


class Origin(NamedTuple):
    label: str       # "exp.yaml:12" or "override `train.lr=1e-4`"
    directory: Path  # what a relative path written there is relative to


Origins = dict[str, Origin]


# ---------------------------------------------------------------- inheritance

def load_chain(path: Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, Origins]:
    """The file merged over its `base:` chain (the file's own keys win). Lists are replaced, not appended."""
    path = path.resolve()
    if path in _seen:
        cycle = " -> ".join(str(p) for p in (*_seen, path))
        raise SpecError([("base", f"inheritance cycle: {cycle}. Remove one of these `base:` keys.")], _seen[0])
    data, positions = load_yaml_file(path)
    if data is None:
        raise SpecError([("", f"{path}: the file is empty; a spec is a mapping of keys (see docs/spec.md)")], path)
    if not isinstance(data, dict):
        raise SpecError([("", f"{path}: a spec must be a mapping of keys, found {type_name(data)}")], path)
    if FROZEN_MARK in data and isinstance(data.get("spec"), dict):
        # A run's frozen spec: start from the spec inside it (so `koe5-run runs/x/spec.yaml seed=2` works).
        data = data["spec"]
        positions = {p[len("spec."):]: label for p, label in positions.items() if p.startswith("spec.")}
    origins = {p: Origin(label, path.parent) for p, label in positions.items()}
    base = data.pop("base", None)
    if base is None:
        return data, origins
    if not isinstance(base, str) or not base:
        raise SpecError([("base", f"{origins['base'].label}: expected a file path, found {base!r}")], path)
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if not base_path.is_file():
        raise SpecError([("base", f"{origins['base'].label}: base file {base_path} does not exist "
                                  f"(relative bases are resolved against {path.parent})")], path)
    base_data, base_origins = load_chain(base_path, (*_seen, path))
    return merge(base_data, data, base_origins, origins)


def merge(base: dict, top: dict, base_origins: Origins, top_origins: Origins) -> tuple[dict, Origins]:
    out = copy.deepcopy(base)
    origins = dict(base_origins)
    _merge_into(out, top, "", origins, top_origins)
    return out, origins


def _merge_into(out: dict, top: dict, prefix: str, origins: Origins, top_origins: Origins) -> None:
    for key, value in top.items():
        path = join_path(prefix, str(key))
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            if path in top_origins:
                origins[path] = top_origins[path]
            _merge_into(out[key], value, path, origins, top_origins)
            continue
        # Replaced wholesale: forget where the old sub-keys came from.
        for old in [p for p in origins if p.startswith(path + ".") or p.startswith(path + "[")]:
            del origins[old]
        origins.update({p: o for p, o in top_origins.items()
                        if p == path or p.startswith(path + ".") or p.startswith(path + "[")})
        out[key] = copy.deepcopy(value)


# ---------------------------------------------------------------- key paths and overrides

_TOKEN = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]")


def parse_path(text: str) -> list[str | int] | None:
    """`data.sources[1].weight` -> ['data', 'sources', 1, 'weight']; None if malformed."""
    tokens: list[str | int] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or (pos == 0 and text.startswith(".")) or (pos > 0 and m.group(1) and text[pos] != "."):
            return None
        tokens.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    return tokens or None


def format_path(tokens: Sequence[str | int]) -> str:
    out = ""
    for t in tokens:
        out = join_path(out, t)
    return out


def check_path(text: str, where: str) -> tuple[list[str | int] | None, Any, str | None]:
    """(tokens, schema type, error message) for a key path typed by a user in an override or a sweep."""
    tokens = parse_path(text)
    if tokens is None:
        return None, None, f"{where}: `{text}` is not a key path (write it like `data.sources[0].weight`)"
    try:
        tp, _ = introspect.type_at(tokens)
    except KeyError as e:
        i, known = e.args
        bad = format_path(tokens[: i + 1])
        if known:
            hint = introspect.suggest(str(tokens[i]), known, format_path(tokens[:i]))
            return tokens, None, f"{where}: unknown key `{bad}`.{hint}"
        parent_type = introspect.unwrap_optional(introspect.type_at(tokens[:i])[0])[0]
        parent = format_path(tokens[:i])
        if introspect.list_item(parent_type) is not None:
            return tokens, None, f"{where}: `{parent}` is a list; address its items as `{parent}[0]`"
        return tokens, None, f"{where}: `{parent}` is {introspect.describe_type(parent_type)}, it has no `{bad}`"
    return tokens, tp, None


def typed_value(text: str, tp: Any) -> Any:
    """Parse an override value as the schema type wants: text stays text, everything else is YAML."""
    inner, optional = introspect.unwrap_optional(tp)
    if inner is str:
        return None if optional and text in ("null", "~") else text
    return parse_value(text)


def apply_override(data: dict, origins: Origins, item: str, cwd: Path) -> str | None:
    """Apply one `key=value` to data in place; returns an error message or None."""
    where = f"override `{item}`"
    if "=" not in item:
        return f"{where}: expected key=value (for example train.lr=1e-4)"
    key, text = item.split("=", 1)
    key = key.strip()
    if key.startswith("sweep."):
        if not isinstance(data.setdefault("sweep", {}), dict):
            return f"{where}: `sweep` is not a mapping"
        data["sweep"][key[len("sweep."):]] = parse_value(text)
        origins[key] = Origin(where, cwd)
        return None
    tokens, tp, error = check_path(key, where)
    if error:
        return error
    error = set_path(data, tokens, typed_value(text, tp), origins, Origin(where, cwd))
    if error:
        return f"{where}: {error}"
    # Pinning a swept key on the command line takes it out of the sweep.
    if isinstance(data.get("sweep"), dict):
        data["sweep"].pop(format_path(tokens), None)
    return None


def set_path(data: dict, tokens: list[str | int], value: Any, origins: Origins, origin: Origin) -> str | None:
    """Set data at a parsed key path, creating mappings on the way; index == length appends to a list.
    Returns an error message or None."""
    node: Any = data
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        if isinstance(token, int):
            size = len(node) if isinstance(node, list) else 0
            if not isinstance(node, list) or token > size:
                return f"`{format_path(tokens[:i + 1])}` does not exist (the list has {size} items; " \
                       f"index {size} appends a new one)"
            if token == size:
                node.append(None)
        elif not isinstance(node, dict):
            return f"`{format_path(tokens[:i])}` is not a mapping"
        if last:
            node[token] = value
        else:
            if node[token] is None if isinstance(token, int) else node.get(token) is None:
                # Start from the schema default, so `eval.k[0]=2` edits the default list [1, 3, 5, 10].
                try:
                    node[token] = copy.deepcopy(_schema_default(tokens[:i + 1]))
                except LookupError:
                    node[token] = [] if isinstance(tokens[i + 1], int) else {}
            node = node[token]
    path = format_path(tokens)
    for old in [p for p in origins if p == path or p.startswith(path + ".") or p.startswith(path + "[")]:
        del origins[old]
    origins[path] = origin
    _record_children(value, path, origin, origins)
    return None


def _record_children(value: Any, path: str, origin: Origin, origins: Origins) -> None:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        child = join_path(path, k if isinstance(k, int) else str(k))
        origins[child] = origin
        _record_children(v, child, origin, origins)


# ---------------------------------------------------------------- interpolation

_REF = re.compile(r"\$\{([^}]*)\}")


def interpolate(data: dict, errors: list[tuple[str, str]], origins: Origins) -> dict:
    """Replace `${key.path}` (and `${env:NAME}`) everywhere. A string that is exactly one reference takes
    the referenced value with its type; references inside longer text are formatted into it."""

    def lookup(ref: str, chain: tuple[str, ...]) -> Any:
        if ref.startswith("env:"):
            name, _, fallback = ref[4:].partition(",")
            if name in os.environ:
                return os.environ[name]
            if fallback:
                return fallback
            raise LookupError(f"environment variable {name} is not set (write ${{env:{name},default}} for a fallback)")
        if ref in chain:
            raise LookupError(f"interpolation cycle: {' -> '.join((*chain, ref))}")
        tokens = parse_path(ref)
        if tokens is None:
            raise LookupError(f"`${{{ref}}}` is not a key path")
        node: Any = data
        for t in tokens:
            if isinstance(t, int) and isinstance(node, list) and t < len(node):
                node = node[t]
            elif isinstance(t, str) and isinstance(node, dict) and t in node:
                node = node[t]
            else:
                node = _schema_default(tokens)
                break
        return resolve(node, ref, (*chain, ref))

    def resolve(value: Any, path: str, chain: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, join_path(path, str(k)), chain) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, join_path(path, i), chain) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _REF.fullmatch(value.strip())
        if whole:
            return lookup(whole.group(1).strip(), chain)
        return _REF.sub(lambda m: _as_text(lookup(m.group(1).strip(), chain)), value)

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, join_path(path, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, join_path(path, i)) for i, v in enumerate(value)]
        try:
            return resolve(value, path, (path,))
        except LookupError as e:
            at = origins.get(path)
            errors.append((path, f"{at.label + ': ' if at else ''}{e.args[0]}"))
            return value

    return walk(data, "")


def _schema_default(tokens: list[str | int]) -> Any:
    """The schema default at a key path that the spec does not set (LookupError if there is none)."""
    ref = format_path(tokens)
    if any(isinstance(t, int) for t in tokens):
        raise LookupError(f"`${{{ref}}}` refers to a list item that is not in the spec")
    node: Any = introspect.defaults_of(schema.Spec)
    for t in tokens:
        if isinstance(node, dict) and t in node:
            node = node[t]
        elif ref in introspect.all_key_paths():
            raise LookupError(f"`${{{ref}}}` refers to a required key that is not set")
        else:
            hint = did_you_mean(ref, introspect.all_key_paths())
            raise LookupError(f"`${{{ref}}}` refers to an unknown key.{hint}")
    return node


def _as_text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise LookupError("a mapping or list cannot be formatted into text; use the reference alone")
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)
