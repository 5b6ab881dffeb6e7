"""Read the records of one training source, whatever its format, each with the place it came from.

A source is a JSONL, JSON (an array of objects, or JSON lines), Parquet, CSV or TSV file; a directory of
such files; a Hugging Face dataset saved with `save_to_disk`; or `hub:owner/name` on the dataset hub.

    for where, record in iter_records("data/train.parquet"):
        ...   # where = "data/train.parquet: row 17"; record = dict, or a DataError for an unreadable line

Records are streamed, never all held at once, so a source of millions of rows fits in memory. A line
that cannot be parsed is yielded as a DataError rather than raised, so `data.on_error: skip` can count
it and go on.

Published datasets come as they were saved, so the reader takes what a source's spec says about them:
`encoding` (cp949 and euc-kr are common for Korean files from Windows; a UTF-8 byte-order mark always wins),
`file_type` (a tab-separated `.txt`) and `columns` (CSV/TSV without a header row). TSV is read literally:
published TSVs (KorSTS, KorNLI, XNLI) put bare quotes inside sentences, which CSV quoting would take as
the start of a multi-line cell and silently merge thousands of rows.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from typing import Iterator

from koe5.data.errors import DataError

HUB_PREFIX = "hub:"
FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
# Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top of their directory.
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

Record = tuple[str, "dict | DataError"]


def is_hub_id(path: str) -> bool:
    return str(path).startswith(HUB_PREFIX)


def iter_records(path: str | Path, split: str = "train", *, encoding: str = "utf-8", file_type: str | None = None,
                 columns: list[str] | None = None) -> Iterator[Record]:
    """`encoding`, `file_type` and `columns` are the source's keys of the same names (see the module doc)."""
    if is_hub_id(str(path)):
        yield from _hub_records(str(path)[len(HUB_PREFIX):], split)
        return
    path = Path(path)
    if path.is_dir():
        if any((path / m).exists() for m in SAVED_DATASET_MARKERS):
            yield from _saved_dataset_records(path, split)
            return
        files = source_files(path, file_type)
        if not files:
            raise DataError(f"{path}: the directory holds no {', '.join(FILE_FORMATS)} files and is not a "
                            "dataset saved with save_to_disk")
        for f in files:
            yield from _file_records(f, encoding, file_type, columns)
        return
    yield from _file_records(path, encoding, file_type, columns)


def source_files(directory: Path, file_type: str | None = None) -> list[Path]:
    """The data files under a directory, in a stable order (the order rows are numbered in). With a
    `file_type`, the files of that type and `.txt` files (all read as that type)."""
    suffixes = {f".{file_type}", ".txt"} if file_type else set(FILE_FORMATS)
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def _file_records(path: Path, encoding: str = "utf-8", file_type: str | None = None,
                  columns: list[str] | None = None) -> Iterator[Record]:
    kind = file_type or FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type '{path.suffix}'; use one of {', '.join(FILE_FORMATS)}, "
                        "a directory of them, a save_to_disk directory or hub:owner/name")
    if kind == "jsonl":
        yield from _jsonl_records(path, encoding)
    elif kind == "json":
        yield from _json_records(path, encoding)
    elif kind == "parquet":
        yield from _parquet_records(path)
    else:
        yield from _csv_records(path, "\t" if kind == "tsv" else ",", encoding, columns)


def not_encoded_as(encoding: str) -> str:
    """What to say about bytes the declared encoding cannot decode (the message goes after 'file:line: ')."""
    if codecs.lookup(encoding).name == "utf-8":
        return ("bytes that are not UTF-8; set the source's encoding: (e.g. cp949 for Korean files saved on "
                "Windows) or re-encode the file as UTF-8")
    return f"bytes that are not {encoding}; check the source's encoding: (the default is utf-8)"


def _decode_line(raw: bytes, where: str, encoding: str = "utf-8") -> "dict | DataError":
    try:
        line = raw.decode(encoding)
    except UnicodeDecodeError as e:
        return DataError(f"{where}: {not_encoded_as(encoding)} (byte {e.start + 1} of the line)")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return DataError(f"{where}: not valid JSON ({e.msg} at character {e.colno} of the line)")
    if not isinstance(row, dict):
        return DataError(f"{where}: expected a JSON object, found {type(row).__name__}")
    return row


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A whole file in its declared encoding (a UTF-8 byte-order mark means UTF-8 and is dropped); a byte
    the encoding cannot decode names its line."""
    raw = Path(path).read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        encoding, raw = "utf-8", raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: {not_encoded_as(encoding)}") from None


def _jsonl_records(path: Path, encoding: str = "utf-8") -> Iterator[Record]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if raw.strip():
                # A BOM-less line in a non-UTF-8 file: decode it as declared (the BOM case was handled above).
                yield f"{path}:{lineno}", _decode_line(raw, f"{path}:{lineno}", encoding)


def _json_records(path: Path, encoding: str = "utf-8") -> Iterator[Record]:
    """A JSON array of objects (each reported at the line it starts on), or JSON lines under a .json name."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_records(path, encoding)
        return
    text = read_text(path, encoding)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:  # one broken array spoils the whole file
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})")
    # Line numbers: walk the top-level elements with raw_decode, which reports where each one starts.
    decoder, pos, line, counted = json.JSONDecoder(), text.index("[") + 1, 1, 0
    for item in items:
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        _, pos = decoder.raw_decode(text, pos)
        where = f"{path}:{line}"
        yield where, item if isinstance(item, dict) else DataError(
            f"{where}: expected a JSON object, found {type(item).__name__}")


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({e})")
    row = 0
    for batch in table.iter_batches(batch_size=8192):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", record


def _csv_records(path: Path, delimiter: str, encoding: str = "utf-8",
                 columns: list[str] | None = None) -> Iterator[Record]:
    """CSV (with CSV quoting) or TSV (literal, see the module doc). `columns` names the cells of a file
    without a header row; a row with fewer cells lacks the last columns (the format reader names them)."""
    text = read_text(path, encoding)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # newline="": the csv module splits lines itself (str.splitlines would also split at U+2028 and the like)
    reader = csv.DictReader(io.StringIO(text, newline=""), fieldnames=columns, delimiter=delimiter, quoting=quoting)
    for record in reader:
        where = f"{path}:{reader.line_num}"
        if None in record:  # more cells than the header (or `columns`) names
            yield where, DataError(f"{where}: {len(record[None])} more cells than the "
                                   f"{len(reader.fieldnames)} columns {'of columns:' if columns else 'of the header'}")
            continue
        yield where, record


def _saved_dataset_records(path: Path, split: str) -> Iterator[Record]:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split '{split}' (it has {', '.join(data)}); set the source's split")
        data = data[split]
    for i, record in enumerate(data, 1):
        yield f"{path}[{split}]: row {i}", record


def _hub_records(dataset_id: str, split: str) -> Iterator[Record]:
    from datasets import load_dataset

    try:
        data = load_dataset(dataset_id, split=split)
    except Exception as e:  # offline, unknown id, missing split: the library's many error types
        raise DataError(f"{HUB_PREFIX}{dataset_id}: cannot load split '{split}' from the dataset hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    for i, record in enumerate(data, 1):
        yield f"{HUB_PREFIX}{dataset_id}[{split}]: row {i}", record
