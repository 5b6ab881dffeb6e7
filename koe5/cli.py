"""`koe5`: the command line for everything except launching runs (that is `koe5-run`).

Each area of koe5 owns its subcommands in a `commands` module exposing `register(subparsers)`;
this file only wires them together, so adding a command never touches another area's code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that contribute subcommands, in the order they appear in `koe5 --help`.
COMMAND_MODULES = (
    "koe5.registry.commands",  # ls, show, compare, diff, best, export, sql, rm
    "koe5.eval.commands",      # eval, bench
    "koe5.spec.commands",      # spec diff
    "koe5.data.commands",      # data stats
    "koe5.data.mine_commands",  # mine
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koe5", description="Query the koe5 run registry and evaluate models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # an area without commands yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every subcommand sets `func`; it returns an exit status and reports its own errors without tracebacks.
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`koe5 ls | head`): what it wanted was printed. Point stdout at devnull so
        # that Python's flush at exit does not fail again, as the Python docs on SIGPIPE advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
