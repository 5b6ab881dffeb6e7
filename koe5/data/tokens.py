"""Tokenized training sources, cached on disk and memory-mapped, so a second run of the same data starts
in seconds and a million triples train in a few hundred MB of RAM.

A source is tokenized once per (tokenizer, max lengths, prefixes, source content, every source key that
decides its triples (fields, split, format, encoding, labels, min_score, holdout, ...),
data.hard_negatives, data.on_error) into $KOE5_CACHE/tokens/<key>/ (arrays in native byte order):

    queries.ids   int32   token ids of every query (prefixed, truncated, special tokens added), concatenated
    queries.off   int64   n_rows + 1 offsets into queries.ids
    queries.len   int32   untruncated length of each query (what `koe5 data stats` reports)
    queries.key   int64   text_key of each query (duplicate counts)
    docs.ids/.off/.len/.key  the same for documents; text_key is what duplicate masking compares
    docs.score    float32 the teacher's score of each document for its row's query (fields.scores), NaN where
                          there is none (a source without scores, a mined negative)
    rows.docs     int64   n_rows + 1: row i's documents are docs[rows.docs[i]:rows.docs[i+1]],
    rows.npos     int32     its positives first (rows.npos[i] of them), then its hard negatives
    leak.exact    int64   hashes of every query and positive, as written and after the leakage guard's
    leak.norm     int64     normalization (koe5/data/leakage.py), so the guard never needs the text
    meta.json     row/document counts, skipped lines, rows the format or holdout left out

Readers only ever see a finished directory: it is built under a temporary name and renamed, and a
file lock makes concurrent runs (or ranks) wait for the one that builds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from koe5.data.errors import DataError
from koe5.data.leakage import normalize
from koe5.data.mine_source import mine_source, mining_identity
from koe5.data.triples import as_source, exact_hash, iter_triples, text_key
from koe5.paths import cache_root

FORMAT_VERSION = 2  # 2: docs.score
BATCH_ROWS = 4096  # rows tokenized per call: big enough for the fast tokenizer, small enough for RAM

ARRAYS = {  # file -> dtype
    "queries.ids": np.int32, "queries.off": np.int64, "queries.len": np.int32, "queries.key": np.int64,
    "docs.ids": np.int32, "docs.off": np.int64, "docs.len": np.int32, "docs.key": np.int64, "docs.score": np.float32,
    "rows.docs": np.int64, "rows.npos": np.int32, "leak.exact": np.int64, "leak.norm": np.int64,
}


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides the token ids: the fast tokenizer's full serialized state (vocab,
    normalizer, pre-tokenizer, post-processor), or a slow tokenizer's vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = backend.to_str()
    else:
        state = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                            tokenizer.all_special_tokens], ensure_ascii=False)
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


# The source keys that change which triples a source gives (weight and name only change how it is drawn
# and shown). A new SourceSpec key that changes the triples must be added here, or a stale cache is reused.
TRIPLE_KEYS = ("fields", "split", "format", "encoding", "file_type", "columns", "labels", "min_score",
               "group_size", "holdout", "mine")


def cache_key(source, data_spec, model_spec, tokenizer_fp: str, source_fp: str) -> str:
    source = as_source(source)  # sections filled, for a SourceSpec built in code
    triple_keys = {k: getattr(source, k) for k in TRIPLE_KEYS}
    triple_keys.update(fields=asdict(source.fields), holdout=asdict(source.holdout), mine=asdict(source.mine))
    if source.mine.negatives:  # mined negatives depend on the mining model's weights too
        triple_keys["mine"] = mining_identity(source, model_spec.name_or_path)
    ingredients = {
        "version": FORMAT_VERSION, "tokenizer": tokenizer_fp, "source": source_fp, **triple_keys,
        "hard_negatives": data_spec.hard_negatives, "on_error": data_spec.on_error,
        "query_prefix": model_spec.query_prefix, "passage_prefix": model_spec.passage_prefix,
        "query_max_len": model_spec.query_max_len, "passage_max_len": model_spec.passage_max_len,
    }
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()[:20]


class TokenizedSource:
    """One source's cached token ids, memory-mapped (pages are read from disk only when a batch needs them)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        self.skipped: int = self.meta["skipped"]
        for name, dtype in ARRAYS.items():  # every file holds data: a source has at least one row
            setattr(self, name.replace(".", "_"), np.memmap(directory / name, dtype=dtype, mode="r"))
        self.n_rows = len(self.queries_len)

    def query(self, row: int) -> np.ndarray:
        return self.queries_ids[self.queries_off[row]:self.queries_off[row + 1]]

    def doc(self, index: int) -> np.ndarray:
        return self.docs_ids[self.docs_off[index]:self.docs_off[index + 1]]

    def positives_of_rows(self) -> np.ndarray:
        """Document index of each row's first positive."""
        return self.rows_docs[:-1]


def open_tokenized(source, spec, tokenizer, tokenizer_fp: str | None = None) -> TokenizedSource:
    """The cached tokenization of `source`, built first if this exact (tokenizer, settings, content) has
    not been tokenized before."""
    from koe5.data.sources import is_hub_id
    from koe5.spec.identity import fingerprint

    source_fp = source.path if is_hub_id(source.path) else fingerprint(source.path)
    key = cache_key(source, spec.data, spec.model, tokenizer_fp or tokenizer_fingerprint(tokenizer), source_fp)
    directory = cache_root() / "tokens" / key
    if not (directory / "meta.json").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(directory) + ".lock"):
            if not (directory / "meta.json").exists():  # another process may have built it while we waited
                partial = directory.with_name(f"{key}.partial-{os.getpid()}")
                shutil.rmtree(partial, ignore_errors=True)
                try:
                    _build(source, spec, tokenizer, partial)
                    os.replace(partial, directory)
                finally:
                    shutil.rmtree(partial, ignore_errors=True)
    return TokenizedSource(directory)


def _build(source, spec, tokenizer, out: Path) -> None:
    out.mkdir(parents=True)
    d = spec.data
    skipped: dict[str, int] | None = {} if d.on_error == "skip" else None
    notes: dict[str, int] = {}
    triples = iter_triples(source, d.hard_negatives, skipped, notes=notes)
    if source.mine.negatives and d.hard_negatives:
        triples = iter(mine_source(source, spec, list(triples), notes))  # the loop below reads an iterator
    backend = _encoder(tokenizer)
    specials = _special_tokens(backend)
    ends = {"queries": 0, "docs": 0, "rows": 0, "documents": 0}  # running totals: offsets continue from them
    with contextlib.ExitStack() as open_files:
        files = {name: open_files.enter_context(open(out / name, "wb")) for name in ARRAYS}
        for name in ("queries.off", "docs.off", "rows.docs"):
            files[name].write(np.zeros(1, np.int64).tobytes())
        with tqdm(desc=f"tokenize {Path(source.path).name}", unit=" rows", dynamic_ncols=True) as bar:
            while chunk := list(itertools.islice(triples, BATCH_ROWS)):
                _write_chunk(files, chunk, backend, spec.model, specials, ends)
                bar.update(len(chunk))
    meta = {"rows": ends["rows"], "documents": ends["documents"], "source": str(source.path),
            "skipped": (skipped or {}).get(str(source.path), 0), "left_out": notes, "version": FORMAT_VERSION}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def _write_chunk(files: dict, chunk: list, backend, m, specials: tuple, ends: dict) -> None:
    docs = [t.positives + t.hard_negatives for t in chunk]
    flat_docs = [x for row in docs for x in row]
    q_ids, q_len = _encode(backend, [t.query for t in chunk], m.query_prefix, m.query_max_len, specials)
    d_ids, d_len = _encode(backend, flat_docs, m.passage_prefix, m.passage_max_len, specials)
    ends["queries"] = _append(files, "queries", q_ids, q_len, [text_key(t.query) for t in chunk], ends["queries"])
    ends["docs"] = _append(files, "docs", d_ids, d_len, [text_key(x) for x in flat_docs], ends["docs"])
    scores = [x for t, row in zip(chunk, docs) for x in (t.scores if t.scores is not None else [np.nan] * len(row))]
    files["docs.score"].write(np.asarray(scores, np.float32).tobytes())
    sizes = np.fromiter((len(row) for row in docs), np.int64, len(docs))
    files["rows.docs"].write((ends["documents"] + np.cumsum(sizes)).tobytes())
    files["rows.npos"].write(np.fromiter((len(t.positives) for t in chunk), np.int32, len(chunk)).tobytes())
    guarded = [x for t in chunk for x in (t.query, *t.positives)]
    files["leak.exact"].write(np.fromiter(map(exact_hash, guarded), np.int64, len(guarded)).tobytes())
    files["leak.norm"].write(np.fromiter((exact_hash(normalize(x)) for x in guarded), np.int64,
                                         len(guarded)).tobytes())
    ends["documents"] += int(sizes.sum())
    ends["rows"] += len(chunk)


def _encoder(tokenizer):
    """A private copy of the fast tokenizer's backend with truncation and padding off (calling the
    transformers tokenizer would change those settings on the shared object)."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; koe5's token cache needs one")
    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def _special_tokens(backend) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after one sequence ([CLS] ... [SEP], <s> ... </s>),
    found by encoding a probe with and without them. Splicing them on is 20x cheaper than calling
    post_process per text, and the cache-equals-tokenizer test checks the result."""
    bare, full = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    raise DataError("the tokenizer's post-processor changes the text's own tokens; koe5's token cache cannot "
                    "reproduce it")


def _encode(backend, texts: list[str], prefix: str, max_len: int, specials: tuple) -> tuple[list, np.ndarray]:
    """Token ids exactly as `tokenizer(prefix + text, truncation=True, max_length=max_len)` gives them, plus
    each text's untruncated length: encode without special tokens, keep the length, truncate, then add the
    special tokens."""
    before, after = specials
    keep = max_len - len(before) - len(after)
    encodings = backend.encode_batch_fast([prefix + t for t in texts], add_special_tokens=False)
    bare = [e.ids for e in encodings]
    full = np.fromiter((len(x) + len(before) + len(after) for x in bare), np.int32, len(bare))
    return [before + x[:keep] + after for x in bare], full


def _append(files: dict, kind: str, ids: list[list[int]], full_len: np.ndarray, keys: list[int], end: int) -> int:
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    files[f"{kind}.ids"].write(np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum())).tobytes())
    files[f"{kind}.off"].write((end + np.cumsum(lengths)).tobytes())
    files[f"{kind}.len"].write(full_len.tobytes())
    files[f"{kind}.key"].write(np.asarray(keys, np.int64).tobytes())
    return end + int(lengths.sum())
