"""`koe5 --help` tells the truth about the commands it lists."""

from __future__ import annotations

import argparse

from koe5.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_group_names_its_real_subcommands_in_its_help():
    top = build_parser()
    helps = {a.dest: a.help for a in next(a for a in top._actions
                                          if isinstance(a, argparse._SubParsersAction))._choices_actions}
    groups = {name: _subcommands(p) for name, p in _subcommands(top).items()}
    groups = {name: subs for name, subs in groups.items() if subs}
    assert {"bench", "data", "spec"} <= set(groups)
    for name, subs in groups.items():
        missing = [s for s in subs if s not in helps[name]]
        assert not missing, f"`koe5 --help` says {name}: {helps[name]!r}, but its subcommands are {sorted(subs)}"
