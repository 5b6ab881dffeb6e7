"""`koe5-run`'s command line: options may come before, between or after the spec and its overrides."""

from __future__ import annotations

import pytest

from koe5.run import parse_args


@pytest.mark.parametrize("argv", [
    ["--dry-run", "spec.yaml", "train.lr=1e-5", "seed=1"],
    ["spec.yaml", "--dry-run", "train.lr=1e-5", "seed=1"],
    ["spec.yaml", "train.lr=1e-5", "--dry-run", "seed=1"],
    ["spec.yaml", "train.lr=1e-5", "seed=1", "--dry-run"],
])
def test_options_anywhere(argv):
    args = parse_args(argv)
    assert args.dry_run and args.spec == "spec.yaml" and args.overrides == ["train.lr=1e-5", "seed=1"]


def test_overrides_of_a_stored_run():
    args = parse_args(["--from-run", "latest", "train.lr=1e-5", "--dry-run"])
    assert args.from_run == "latest" and args.spec is None and args.overrides == ["train.lr=1e-5"]
