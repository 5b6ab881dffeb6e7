"""What the schema says about a key: its type, its default, the keys next to it.

The loader, the override parser and the docs generator all ask these questions, so they live here once.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from typing import Any, Literal, Union

from koe5.spec import schema
from koe5.spec.schema import REQUIRED


@functools.cache
def fields_of(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """name -> (resolved type, Field) for a schema dataclass, in declaration order."""
    hints = typing.get_type_hints(cls, vars(schema))
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def list_item(tp: Any) -> Any | None:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def is_free_dict(tp: Any) -> bool:
    """`dict` keys (deepspeed.extra) accept anything below them."""
    return tp is dict or typing.get_origin(tp) is dict


def default_of(f: dataclasses.Field, tp: Any) -> Any:
    """The default a missing key takes; REQUIRED if it has none. Sections default to their own defaults."""
    if f.metadata.get("required"):
        return REQUIRED
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    if f.default is None and is_section(tp):
        return defaults_of(tp)
    return f.default


def defaults_of(cls: type) -> dict[str, Any]:
    """The defaults of a section as a plain dict (required keys left out)."""
    out = {}
    for name, (tp, f) in fields_of(cls).items():
        value = default_of(f, unwrap_optional(tp)[0])
        if value is not REQUIRED:
            out[name] = value
    return out


def describe_type(tp: Any) -> str:
    """Human words for a type, used in 'expected ..., found ...' messages and in the docs."""
    inner, optional = unwrap_optional(tp)
    if typing.get_origin(inner) is Literal:
        words = " | ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(inner))
        text = f"one of {words}"
    elif is_section(inner):
        text = "a mapping"
    elif list_item(inner) is not None:
        text = f"a list of {describe_type(list_item(inner))}"
    elif is_free_dict(inner):
        text = "a mapping"
    else:
        text = {str: "text", int: "an integer", float: "a number", bool: "true or false"}.get(inner, str(inner))
    return text + (" or null" if optional else "")


def type_at(tokens: list[str | int]) -> tuple[Any, list[str | int]]:
    """Walk the schema along a parsed key path. Returns (type, tokens consumed into a free dict).

    Raises KeyError(position, known_names) at the first token that the schema does not know.
    """
    tp: Any = schema.Spec
    for i, token in enumerate(tokens):
        tp = unwrap_optional(tp)[0]
        if is_free_dict(tp):
            return tp, tokens[i:]
        if isinstance(token, int):
            item = list_item(tp)
            if item is None:
                raise KeyError(i, [])
            tp = item
        elif is_section(tp):
            known = fields_of(tp)
            if token not in known:
                raise KeyError(i, list(known))
            tp = known[token][0]
        else:
            raise KeyError(i, [])
    return tp, []


@functools.cache
def all_key_paths(cls: type = schema.Spec, prefix: str = "") -> tuple[str, ...]:
    """Every key path of the schema (list items as `[0]`), for did-you-mean over whole paths."""
    out: list[str] = []
    for name, (tp, _) in fields_of(cls).items():
        path = f"{prefix}.{name}" if prefix else name
        out.append(path)
        inner = unwrap_optional(tp)[0]
        if is_section(inner):
            out += all_key_paths(inner, path)
        elif list_item(inner) is not None and is_section(list_item(inner)):
            out += all_key_paths(list_item(inner), path + "[0]")
    return tuple(out)


def suggest(key: str, known: list[str], parent: str) -> str:
    """' Did you mean `x`?' for an unknown key: the same key in another section first (a key put in the
    wrong section is the commonest slip), then a close spelling here, else the keys allowed here."""
    here = f"{parent}.{key}" if parent else key
    elsewhere = [p for p in all_key_paths() if p.rsplit(".", 1)[-1] == key and p != here and "[0]" not in p]
    if len(elsewhere) == 1:
        return f" Did you mean `{elsewhere[0]}`?"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f" Did you mean `{parent + '.' if parent else ''}{close[0]}`?"
    return f" Known keys{' under ' + parent if parent else ''}: {', '.join(known)}."


def resume_safe(key_path: str) -> bool:
    """Whether `key_path` (e.g. "eval.benchmarks[0].path") may change when a run resumes: true when the key
    or a section above it is marked `resume_safe` in the schema. output_dir and registry.path only say
    where results go."""
    tokens = [t for t in re.split(r"\.|\[\d+\]", key_path) if t]
    if tokens[:1] == ["output_dir"] or tokens[:2] == ["registry", "path"]:
        return True
    cls: Any = schema.Spec
    for token in tokens:
        fields = fields_of(cls) if is_section(cls) else {}
        if token not in fields:
            return False
        tp, f = fields[token]
        if f.metadata.get("resume_safe"):
            return True
        tp, _ = unwrap_optional(tp)
        cls = list_item(tp) or tp
    return False
