"""Read (query, document, hard negatives) triples from JSONL files, with errors that name file:line."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A problem in a training file; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Triple:
    query: str
    document: str
    hard_negatives: tuple[str, ...]


_SPACE = re.compile(r"\s+")


def text_key(text: str) -> int:
    """Identity of a document for duplicate masking: a 63-bit hash of its normalized text
    (NFKC, whitespace collapsed, case folded), so trivially different copies count as the same."""
    norm = _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little") >> 1


def _field(row: dict, name: str, where: str, allow_list: bool) -> tuple[str, ...]:
    if name not in row:
        raise DataError(f"{where}: missing field '{name}' (each line needs query, document and hard_negative)")
    value = row[name]
    values = value if (allow_list and isinstance(value, list)) else [value]
    if not values:
        raise DataError(f"{where}: field '{name}' is an empty list")
    for v in values:
        if not isinstance(v, str):
            raise DataError(f"{where}: field '{name}' must be a string, found {type(v).__name__}")
        if not v.strip():
            raise DataError(f"{where}: field '{name}' is empty")
    return tuple(values)


def read_triples(path: str | Path, hard_negatives: int = 1, skipped: dict | None = None) -> list[Triple]:
    """All triples of one JSONL file. `hard_negative` may be a string or a list of strings; with
    `hard_negatives > 0` every row must carry at least that many. A bad line raises DataError, unless
    `skipped` is given (data.on_error: skip): then the line is left out and counted in skipped[str(path)]."""
    path = Path(path)
    triples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                triples.append(_parse_line(raw, f"{path}:{lineno}", hard_negatives))
            except DataError:
                if skipped is None:
                    raise
                skipped[str(path)] = skipped.get(str(path), 0) + 1
    if not triples:
        raise DataError(f"{path}: the file holds no triples" + (" that could be read" if skipped and skipped.get(str(path)) else ""))
    return triples


def _parse_line(raw: bytes, where: str, hard_negatives: int) -> Triple:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: bytes that are not UTF-8 at column {e.start + 1}; re-encode the file as UTF-8")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(row).__name__}")
    query = _field(row, "query", where, allow_list=False)[0]
    document = _field(row, "document", where, allow_list=True)[0]
    negatives: tuple[str, ...] = ()
    if hard_negatives > 0:
        negatives = _field(row, "hard_negative", where, allow_list=True)
        if len(negatives) < hard_negatives:
            raise DataError(f"{where}: field 'hard_negative' has {len(negatives)} negatives, "
                            f"data.hard_negatives asks for {hard_negatives}")
    return Triple(query, document, negatives)
