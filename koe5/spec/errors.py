"""SpecError: every problem found in a spec, reported together, each with its key path.

Validation never stops at the first problem: it collects (key path, message) pairs and raises one
SpecError at the end, so a researcher fixes a spec in one round instead of one GPU job per typo.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable


class SpecError(Exception):
    """Raised when a spec cannot be loaded. `.errors` is a list of (key_path, message)."""

    def __init__(self, errors: list[tuple[str, str]], source: str | Path | None = None):
        self.errors = list(errors)
        self.source = str(source) if source is not None else None
        super().__init__(self.report())

    def report(self) -> str:
        where = f"spec {self.source}" if self.source else "spec"
        n = len(self.errors)
        lines = [f"{where}: {n} error{'s' if n != 1 else ''}:"]
        for path, message in self.errors:
            lines.append(f"  - {path}: {message}" if path else f"  - {message}")
        lines.append("Nothing was run. Every key, its type and default is listed in docs/spec.md.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean `x`?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""


def join_path(prefix: str, key: str | int) -> str:
    """Key paths as users write them: `data.sources[1].weight`."""
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else key
