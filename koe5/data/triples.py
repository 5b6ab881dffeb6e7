"""Turn source records into (query, positives, hard negatives) triples, with errors that name file:line
and the field. Where the records come from (JSONL, Parquet, CSV, ...) is koe5/data/sources.py's job."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from koe5.data.errors import DataError
from koe5.data.sources import iter_records

__all__ = ["DataError", "Triple", "iter_triples", "read_triples", "text_key", "exact_hash"]

# The canonical field names; a source's `fields:` maps them to its own column names.
CANONICAL_FIELDS = ("query", "document", "hard_negative")


@dataclass(frozen=True)
class Triple:
    query: str
    positives: tuple[str, ...]        # one or more; data.positive picks which one a step uses
    hard_negatives: tuple[str, ...]

    @property
    def document(self) -> str:
        return self.positives[0]


_SPACE = re.compile(r"\s+")


def text_key(text: str) -> int:
    """Identity of a document for duplicate masking: a 63-bit hash of its normalized text
    (NFKC, whitespace collapsed, case folded), so trivially different copies count as the same."""
    norm = _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()
    return exact_hash(norm)


def exact_hash(text: str) -> int:
    """A 63-bit hash of the text exactly as it is."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _field(record: dict, name: str, column: str, where: str, allow_list: bool) -> tuple[str, ...]:
    label = f"'{column}'" if column == name else f"'{column}' ({name})"
    if record.get(column) is None:
        raise DataError(f"{where}: missing field {label}; each record needs query, document and hard_negative "
                        "(map other column names with the source's fields:)")
    value = record[column]
    values = list(value) if (allow_list and isinstance(value, (list, tuple))) else [value]
    if not values:
        raise DataError(f"{where}: field {label} is an empty list")
    for v in values:
        if not isinstance(v, str):
            raise DataError(f"{where}: field {label} must be a string{' or a list of strings' if allow_list else ''}, "
                            f"found {type(v).__name__}")
        if not v.strip():
            raise DataError(f"{where}: field {label} is empty")
    return tuple(values)


def parse_record(record: dict, where: str, hard_negatives: int, fields: dict[str, str] | None = None) -> Triple:
    """One triple; `fields` maps canonical names to the record's column names."""
    col = {name: (fields or {}).get(name) or name for name in CANONICAL_FIELDS}
    query = _field(record, "query", col["query"], where, allow_list=False)[0]
    positives = _field(record, "document", col["document"], where, allow_list=True)
    negatives: tuple[str, ...] = ()
    if hard_negatives > 0:
        negatives = _field(record, "hard_negative", col["hard_negative"], where, allow_list=True)
        if len(negatives) < hard_negatives:
            raise DataError(f"{where}: field '{col['hard_negative']}' has {len(negatives)} negatives, "
                            f"data.hard_negatives asks for {hard_negatives}")
    return Triple(query, positives, negatives)


def iter_triples(path: str | Path, hard_negatives: int = 1, skipped: dict | None = None,
                 fields: dict[str, str] | None = None, split: str = "train") -> Iterator[Triple]:
    """The triples of one source, streamed. A bad record raises DataError, unless `skipped` is given
    (data.on_error: skip): then it is left out and counted in skipped[str(path)]. A source with no
    readable triple is an error either way."""
    count = 0
    for where, record in iter_records(path, split):
        try:
            if isinstance(record, DataError):
                raise record
            triple = parse_record(record, where, hard_negatives, fields)
        except DataError:
            if skipped is None:
                raise
            skipped[str(path)] = skipped.get(str(path), 0) + 1
            continue
        count += 1
        yield triple
    if not count:
        raise DataError(f"{path}: the source holds no triples"
                        + (" that could be read" if skipped and skipped.get(str(path)) else ""))


def read_triples(path: str | Path, hard_negatives: int = 1, skipped: dict | None = None,
                 fields: dict[str, str] | None = None, split: str = "train") -> list[Triple]:
    """All triples of one source, in a list (see iter_triples)."""
    return list(iter_triples(path, hard_negatives, skipped, fields, split))
