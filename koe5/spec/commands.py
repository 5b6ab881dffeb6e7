"""`koe5 spec ...`: look at specs without running them.

    koe5 spec check FILE [key=value ...]   validate, list the concrete specs with their hashes
    koe5 spec show FILE [key=value ...]    print the resolved spec (every key, defaults filled)
    koe5 spec diff A B                     key paths whose values differ; A and B are spec files or run ids
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from koe5.spec.diff import ABSENT, diff
from koe5.spec.errors import SpecError
from koe5.spec.load import expand


def register(subparsers) -> None:
    spec = subparsers.add_parser("spec", help="check, show and diff experiment specs")
    sub = spec.add_subparsers(dest="spec_command", metavar="SPEC_COMMAND")
    sub.required = True

    check = sub.add_parser("check", help="validate a spec and list its concrete specs with their hashes")
    check.add_argument("file")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    check.add_argument("--no-device-checks", action="store_true",
                       help="skip checks against this machine's GPUs (for specs launched elsewhere)")
    check.set_defaults(func=cmd_check)

    show = sub.add_parser("show", help="print the resolved spec as YAML")
    show.add_argument("file")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.set_defaults(func=cmd_show)

    diff = sub.add_parser("diff", help="print the key paths where two specs differ, with both values")
    diff.add_argument("a", help="spec file or run id (prefix)")
    diff.add_argument("b", help="spec file or run id (prefix)")
    diff.add_argument("--registry", help="registry file for run ids (default: $KOE5_REGISTRY or registry/koe5.duckdb)")
    diff.add_argument("--json", action="store_true", help="print a JSON list of {key, a, b}")
    diff.set_defaults(func=cmd_diff)


def cmd_check(args) -> int:
    try:
        specs = expand(args.file, args.overrides, check_devices=not args.no_device_checks)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    for rs in specs:
        swept = " ".join(f"{k}={v}" for k, v in rs.sweep_values.items())
        print(f"{rs.spec_hash}  {rs.spec.name}  {swept}".rstrip())
        for w in rs.warnings:
            print(f"  warning: {w}")
    return 0


def cmd_show(args) -> int:
    try:
        specs = expand(args.file, args.overrides, check_devices=False)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    print("\n---\n".join(rs.to_yaml() for rs in specs), end="")
    return 0


def cmd_diff(args) -> int:
    try:
        a_label, a = _load_side(args.a, args.registry)
        b_label, b = _load_side(args.b, args.registry)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    except LookupError as e:
        print(f"koe5 spec diff: {e.args[0]}", file=sys.stderr)
        return 2
    rows = diff(a, b)
    if args.json:
        print(json.dumps([{"key": k, "a": va, "b": vb} for k, va, vb in rows], ensure_ascii=False, indent=2))
        return 0
    print(f"--- {a_label}\n+++ {b_label}")
    if not rows:
        print("(no differences)")
    for key, va, vb in rows:
        print(f"{key}: {_show(va)} -> {_show(vb)}")
    return 0


def _show(value: Any) -> str:
    return value if value is ABSENT else json.dumps(value, ensure_ascii=False)


def _load_side(ref: str, registry: str | None) -> tuple[str, dict]:
    """A spec file (validated and resolved; a sweep must have one member) or a run id from the registry."""
    if Path(ref).is_file():
        specs = expand(ref, check_devices=False)
        if len(specs) != 1:
            raise LookupError(f"{ref} expands to a sweep of {len(specs)} specs; pin the swept keys first "
                              "(koe5 spec show FILE key=value > one.yaml)")
        return f"{ref} (spec_hash {specs[0].spec_hash})", specs[0].data
    return _run_spec(ref, registry)


def _run_spec(run_id: str, registry: str | None) -> tuple[str, dict]:
    try:
        from koe5.registry import Registry, RegistryError
    except ImportError:
        raise LookupError(f"{run_id} is not a file, and run ids need the koe5 registry, "
                          "which is not available in this install") from None
    try:
        run = Registry(registry).get_run(run_id)  # None: $KOE5_REGISTRY or registry/koe5.duckdb
    except RegistryError as e:
        raise LookupError(f"{run_id} is neither a spec file nor a run id: {e}") from None
    if not run.get("spec_yaml"):
        raise LookupError(f"run {run['run_id']} has no stored spec")
    return f"run {run['run_id']} (spec_hash {run.get('spec_hash')})", yaml.safe_load(run["spec_yaml"])


if __name__ == "__main__":  # `python -m koe5.spec.commands ...` works without the koe5 entry point
    parser = argparse.ArgumentParser(prog="koe5")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
