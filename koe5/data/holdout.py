"""The holdout split: which side (`bench` or `train`) a source's unit falls on.

A unit (article title, query id, premise, paraphrase group: see koe5/data/formats.py) goes to the bench
side when a hash of (seed, unit) falls below `holdout.fraction`. A hash, not the unit's position, so the
split does not change when the file is reordered or extended, and the training side of a source never
sees a query or passage of a bench-side unit: every triple of a unit lands on the same side.
"""

from __future__ import annotations

import hashlib

SIDES = ("train", "bench")


def bench_share(unit: str, seed: int) -> float:
    """A number in [0, 1), uniform over units, fixed by (seed, unit)."""
    digest = hashlib.blake2b(f"{seed}\0{unit}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def side_of(unit: str, fraction: float, seed: int) -> str:
    return "bench" if bench_share(unit, seed) < fraction else "train"


def active(holdout) -> bool:
    """Whether the source is split at all (`holdout.fraction` > 0)."""
    return holdout is not None and holdout.fraction > 0
