"""The triples of one training source: (query, positives, hard negatives), with errors that name file:line
and the field. Where the records come from (JSONL, Parquet, CSV, encodings, ...) is koe5/data/sources.py's
job; how each published layout (`format:`) becomes triples is koe5/data/formats.py's; this module applies
the source's error policy (data.on_error) and its holdout side (koe5/data/holdout.py)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import replace
from typing import Iterator

from koe5.data.errors import DataError
from koe5.data.formats import Triple, parse_record, read_format
from koe5.data.holdout import active, side_of

__all__ = ["DataError", "Triple", "iter_triples", "read_triples", "as_source", "parse_record", "text_key",
           "exact_hash"]

_SPACE = re.compile(r"\s+")


def text_key(text: str) -> int:
    """Identity of a document for duplicate masking: a 63-bit hash of its normalized text
    (NFKC, whitespace collapsed, case folded), so trivially different copies count as the same."""
    norm = _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()
    return exact_hash(norm)


def exact_hash(text: str) -> int:
    """A 63-bit hash of the text exactly as it is."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def as_source(source, fields: dict | None = None, split: str = "train"):
    """A SourceSpec for `source`: itself if it is one, else a triples source at that path whose `fields`
    dict maps canonical names to columns (an absent name keeps its default; `hard_negative: None` = no
    negatives column). How koe5/data/mine.py and older callers name a source."""
    from koe5.spec.schema import FieldsSpec, HoldoutSpec, MineSpec, SourceSpec

    if isinstance(source, SourceSpec):
        if source.fields is None or source.holdout is None or source.mine is None:  # built in code, not validated
            source = replace(source, fields=source.fields or FieldsSpec(), holdout=source.holdout or HoldoutSpec(),
                             mine=source.mine or MineSpec())
        return source
    given = {k: v for k, v in (fields or {}).items() if v is not None or k == "hard_negative"}
    return SourceSpec(path=str(source), fields=FieldsSpec(**given), split=split, holdout=HoldoutSpec(),
                      mine=MineSpec())


MAX_REPORTED = 20  # bad records named in one error; the rest are counted


def iter_triples(path, hard_negatives: int = 1, skipped: dict | None = None,
                 fields: dict[str, str] | None = None, split: str = "train",
                 notes: dict | None = None) -> Iterator[Triple]:
    """The triples of one source, streamed. `path` is a SourceSpec (its format, encoding, fields, holdout
    side, ...) or a path to a triples source (with `fields` and `split`). Negatives are read only when
    `hard_negatives` > 0; a triple may have fewer than asked (even none).

    Bad records raise one DataError naming each (the first MAX_REPORTED, and how many in all) once the
    source is read to the end, so that one run finds them all, unless `skipped` is given (data.on_error:
    skip): then they are left out and counted in skipped[str(path)]. Rows a format leaves out by design,
    and triples of the other holdout side, are counted by reason in `notes`. A source with no readable
    triple is an error."""
    source = as_source(path, fields, split)
    key = str(source.path)
    left_out: Counter = Counter()
    split_by = source.holdout if active(source.holdout) else None
    count, bad = 0, []
    for item in read_format(source, hard_negatives > 0, left_out):
        if isinstance(item, DataError):
            if skipped is None:
                bad.append(item)
            else:
                skipped[key] = skipped.get(key, 0) + 1
            continue
        if split_by and side_of(item.unit, split_by.fraction, split_by.seed) != split_by.side:
            left_out[f"holdout: {'train' if split_by.side == 'bench' else 'bench'} side"] += 1
            continue
        count += 1
        yield item
    if len(bad) == 1:
        raise bad[0]
    if bad:
        shown = "\n".join(f"  {e}" for e in bad[:MAX_REPORTED])
        more = f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
        raise DataError(f"{key}: {len(bad)} bad records{' (the first ' + str(MAX_REPORTED) + ')' if more else ''}:"
                        f"\n{shown}{more}\nFix them, or set data.on_error=skip to leave them out and count them.")
    if notes is not None:
        for reason, n in left_out.items():
            notes[reason] = notes.get(reason, 0) + n
    if not count:
        raise DataError(f"{key}: the source holds no triples"
                        + (" that could be read" if skipped and skipped.get(key) else "")
                        + (f" (left out: {dict(left_out)})" if left_out else ""))


def read_triples(path, hard_negatives: int = 1, skipped: dict | None = None,
                 fields: dict[str, str] | None = None, split: str = "train",
                 notes: dict | None = None) -> list[Triple]:
    """All triples of one source, in a list (see iter_triples)."""
    return list(iter_triples(path, hard_negatives, skipped, fields, split, notes))
