"""Load a retrieval benchmark from disk into one in-memory `Benchmark`, whatever its layout.

Layouts (detected from the files present):
- BEIR: corpus.jsonl ({"_id", "title", "text"}), queries.jsonl ({"_id", "text"}),
  qrels/test.tsv (header `query-id corpus-id score`).
- AutoRAG (the Korean embedding benchmark's own layout): qa*.parquet (`qid`, `query`, `retrieval_gt` =
  list of lists of doc ids, every one relevant with grade 1) and *corpus*.parquet (`doc_id`, `contents`).
- Hugging Face / MTEB retrieval datasets saved locally: subdirectories `corpus/`, `queries/` and `qrels/`
  (or `default/`, MTEB's name for the qrels config), each either a `save_to_disk` dataset or a folder
  of parquet / jsonl files as downloaded from the hub. Columns as in BEIR. The qrels split used is
  `test`, else `dev`, else `validation`, else the only one.
- A preset name (see koe5.eval.presets) resolves to a directory downloaded by `koe5 bench fetch`.

Passage text follows BEIR/MTEB: `(title + " " + text).strip()` when the document has a title, else
`text.strip()`; the model sees exactly `corpus_texts`.

Only queries that appear in the qrels are kept (BEIR's queries.jsonl holds every split's queries).
Queries whose judgments are all 0 are kept; the metrics exclude them and say so.

The fingerprint hashes the content the evaluation actually uses (passage texts, query texts and
judgments, each sorted by id), not the files, so the same benchmark in two layouts has the same
fingerprint and any edit to a passage, query or judgment changes it.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from dataclasses import dataclass


class BenchmarkError(ValueError):
    """A benchmark file is missing or malformed; the message names the file (and line) and the fix."""


@dataclass
class Benchmark:
    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    fingerprint: str
    path: str = ""
    layout: str = ""


def passage_text(title: str | None, text: str) -> str:
    """BEIR/MTEB's passage string: title and text joined by a space, stripped."""
    return (title + " " + text).strip() if isinstance(title, str) and title else text.strip()


def content_fingerprint(
    corpus: dict[str, str], queries: dict[str, str], qrels: dict[str, dict[str, int]]
) -> str:
    h = hashlib.sha256()
    # JSON of sorted items is unambiguous (no separator can be forged by the text itself).
    for part in (sorted(corpus.items()), sorted(queries.items()),
                 sorted((q, sorted(j.items())) for q, j in qrels.items())):
        h.update(json.dumps(part, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def _own_name(path: str) -> str:
    """The name a benchmark directory gives itself (`name` in its meta.json, as `koe5 data bench` writes and
    the shipped ko-sample has), so that `koe5 eval --benchmark DIR` reports under the same column as a spec
    naming it; otherwise the directory's name."""
    meta = os.path.join(path, "meta.json")
    if os.path.isfile(meta):
        try:
            with open(meta, encoding="utf-8") as f:
                own = json.load(f).get("name")
        except (OSError, ValueError, AttributeError) as e:
            raise BenchmarkError(f"benchmark {path}: meta.json is not a JSON object ({e}); fix or remove it.")
        if isinstance(own, str) and own.strip():
            return own.strip()
    return os.path.basename(os.path.normpath(path))


def load_benchmark(path_or_preset: str, name: str | None = None) -> Benchmark:
    """Load a BEIR or AutoRAG directory, or a preset name that has been fetched."""
    path = path_or_preset
    if not os.path.exists(path):
        from koe5.eval.presets import PRESETS, preset_dir

        if path not in PRESETS:
            raise BenchmarkError(
                f"benchmark '{path}': no such directory and not a preset name "
                f"(presets: {', '.join(sorted(PRESETS))}). Give a BEIR or AutoRAG directory or a preset name."
            )
        path = preset_dir(path)
        if not os.path.isdir(path):
            raise BenchmarkError(
                f"benchmark preset '{path_or_preset}' is not downloaded yet (expected at {path}). "
                f"Run `koe5 bench fetch {path_or_preset}` on a machine with internet, or copy the directory there."
            )
        name = name or path_or_preset
    if not os.path.isdir(path):
        raise BenchmarkError(f"benchmark '{path}' is a file; give the benchmark's directory.")

    if os.path.exists(os.path.join(path, "corpus.jsonl")):
        layout, (corpus, queries, qrels) = "beir", _read_beir(path)
    elif glob.glob(os.path.join(path, "qa*.parquet")):
        layout, (corpus, queries, qrels) = "autorag", _read_autorag(path)
    elif os.path.isdir(os.path.join(path, "corpus")) and os.path.isdir(os.path.join(path, "queries")):
        layout, (corpus, queries, qrels) = "hf", _read_hf(path)
    else:
        raise BenchmarkError(
            f"benchmark directory {path}: no corpus.jsonl (BEIR layout), no qa*.parquet (AutoRAG layout) and no "
            "corpus/ + queries/ + qrels/ subdirectories (Hugging Face layout). "
            "Point --benchmark at the directory holding those files."
        )

    queries = {q: t for q, t in queries.items() if q in qrels}
    # Judgments for queries with no text cannot be asked; drop them rather than fail on real datasets.
    qrels = {q: j for q, j in qrels.items() if q in queries}
    if not qrels:
        raise BenchmarkError(f"benchmark {path}: no query in the qrels has a query text; check the query ids.")

    corpus_ids = list(corpus)
    query_ids = list(queries)
    return Benchmark(
        name=name or _own_name(path),
        corpus_ids=corpus_ids,
        corpus_texts=[corpus[d] for d in corpus_ids],
        query_ids=query_ids,
        query_texts=[queries[q] for q in query_ids],
        qrels=qrels,
        fingerprint=content_fingerprint(corpus, queries, qrels),
        path=os.path.abspath(path),
        layout=layout,
    )


# ---- BEIR ----

def _read_jsonl(file: str, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    if not os.path.exists(file):
        raise BenchmarkError(f"{file}: missing. A BEIR benchmark needs corpus.jsonl, queries.jsonl and qrels/test.tsv.")
    rows = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{file}:{lineno}: not valid JSON ({e.msg}); fix or remove that line.") from None
            if not isinstance(row, dict):
                raise BenchmarkError(f"{file}:{lineno}: expected a JSON object with keys {list(fields)}.")
            for key in fields:
                if key not in row:
                    raise BenchmarkError(f"{file}:{lineno}: missing key '{key}' (each line needs {list(fields)}).")
            if not isinstance(row.get("text"), str) or not isinstance(row.get("title", ""), (str, type(None))):
                raise BenchmarkError(f"{file}:{lineno}: 'text' (and 'title' if given) must be strings.")
            rows.append((lineno, row))
    return rows


def _unique(file: str, rows: list[tuple[int, str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, key, text in rows:
        if key in out:
            raise BenchmarkError(f"{file}:{lineno}: duplicate id '{key}' (first on line {first_line[key]}); ids must be unique.")
        out[key] = text
        first_line[key] = lineno
    return out


def _read_beir(path: str) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    corpus_file = os.path.join(path, "corpus.jsonl")
    queries_file = os.path.join(path, "queries.jsonl")
    corpus = _unique(corpus_file, [(n, str(r["_id"]), passage_text(r.get("title"), r["text"]))
                                   for n, r in _read_jsonl(corpus_file, ("_id", "text"))])
    queries = _unique(queries_file, [(n, str(r["_id"]), r["text"]) for n, r in _read_jsonl(queries_file, ("_id", "text"))])
    return corpus, queries, _read_qrels_tsv(os.path.join(path, "qrels", "test.tsv"))


def _read_qrels_tsv(file: str) -> dict[str, dict[str, int]]:
    if not os.path.exists(file):
        raise BenchmarkError(f"{file}: missing. A BEIR benchmark needs qrels/test.tsv (query-id, corpus-id, score).")
    qrels: dict[str, dict[str, int]] = {}
    with open(file, encoding="utf-8", newline="") as f:
        for lineno, cells in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not cells or not "".join(cells).strip():
                continue
            if lineno == 1 and cells[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue  # header
            if len(cells) != 3:
                raise BenchmarkError(f"{file}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cells)}.")
            qid, did, score = (c.strip() for c in cells)
            try:
                grade = int(float(score))
            except ValueError:
                raise BenchmarkError(f"{file}:{lineno}: score '{score}' is not a number.") from None
            if grade != float(score):
                raise BenchmarkError(f"{file}:{lineno}: score '{score}' must be an integer relevance grade.")
            qrels.setdefault(qid, {})[did] = grade
    return qrels


# ---- AutoRAG ----

def _read_parquet(file: str, columns: tuple[str, ...]):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise BenchmarkError(f"{file}: cannot be read as parquet ({e}).") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise BenchmarkError(f"{file}: missing column(s) {missing}; the AutoRAG layout needs {list(columns)} "
                             f"(found {table.column_names}).")
    return table.select(list(columns)).to_pylist()


def _read_autorag(path: str) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    qa_files = sorted(glob.glob(os.path.join(path, "qa*.parquet")))
    corpus_files = sorted(glob.glob(os.path.join(path, "*corpus*.parquet")))
    if not corpus_files:
        raise BenchmarkError(f"benchmark directory {path}: has qa*.parquet but no corpus*.parquet (doc_id, contents).")

    corpus: dict[str, str] = {}
    for file in corpus_files:
        for row_no, row in enumerate(_read_parquet(file, ("doc_id", "contents")), 1):
            did = str(row["doc_id"])
            if did in corpus:
                raise BenchmarkError(f"{file}: row {row_no}: duplicate doc_id '{did}'.")
            if not isinstance(row["contents"], str):
                raise BenchmarkError(f"{file}: row {row_no}: 'contents' must be a string.")
            corpus[did] = row["contents"].strip()

    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for file in qa_files:
        for row_no, row in enumerate(_read_parquet(file, ("qid", "query", "retrieval_gt")), 1):
            qid = str(row["qid"])
            if qid in queries:
                raise BenchmarkError(f"{file}: row {row_no}: duplicate qid '{qid}'.")
            gt = row["retrieval_gt"]
            if not isinstance(gt, list) or not all(isinstance(g, list) for g in gt):
                raise BenchmarkError(f"{file}: row {row_no}: 'retrieval_gt' must be a list of lists of doc ids.")
            queries[qid] = row["query"]
            qrels[qid] = {str(d): 1 for group in gt for d in group}
    return corpus, queries, qrels


# ---- Hugging Face / MTEB, saved locally ----

SPLIT_PREFERENCE = ("test", "dev", "validation")


def _pick_split(where: str, splits: list[str]) -> str:
    for name in SPLIT_PREFERENCE:
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    raise BenchmarkError(f"{where}: cannot tell which split to evaluate among {sorted(splits)}; "
                         f"keep only one, or name it one of {list(SPLIT_PREFERENCE)}.")


def _read_hf_config(folder: str) -> list[dict]:
    """Rows of one config folder: a `save_to_disk` dataset (dict) or parquet/jsonl files split by name."""
    if os.path.exists(os.path.join(folder, "dataset_dict.json")) or os.path.exists(os.path.join(folder, "state.json")):
        from datasets import load_from_disk

        data = load_from_disk(folder)
        if hasattr(data, "keys"):  # a DatasetDict
            data = data[_pick_split(folder, list(data.keys()))]
        return data.to_list()
    files = sorted(f for pattern in ("*.parquet", "*.jsonl", "*.jsonl.gz", "*/*.parquet")
                   for f in glob.glob(os.path.join(folder, pattern)))
    if not files:
        raise BenchmarkError(f"{folder}: holds no dataset (no dataset_dict.json, no parquet or jsonl files).")
    # Hub file names start with their split (test-00000-of-00001.parquet, dev.jsonl); corpus/queries have one.
    by_split: dict[str, list[str]] = {}
    for f in files:
        by_split.setdefault(os.path.basename(f).split("-")[0].split(".")[0], []).append(f)
    chosen = by_split[_pick_split(folder, list(by_split))] if len(by_split) > 1 else files
    import pandas as pd

    rows: list[dict] = []
    for f in chosen:
        try:
            frame = pd.read_parquet(f) if f.endswith(".parquet") else pd.read_json(f, lines=True, dtype=False)
        except Exception as e:  # pandas/pyarrow raise several types for unreadable files
            raise BenchmarkError(f"{f}: cannot be read ({e}).") from None
        rows.extend(frame.to_dict("records"))
    return rows


def _columns(folder: str, rows: list[dict], columns: tuple[str, ...]) -> None:
    if rows and any(c not in rows[0] for c in columns):
        raise BenchmarkError(f"{folder}: needs columns {list(columns)}, found {list(rows[0])}.")


def _read_hf(path: str) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    corpus_dir, queries_dir = os.path.join(path, "corpus"), os.path.join(path, "queries")
    qrels_dir = next((os.path.join(path, d) for d in ("qrels", "default") if os.path.isdir(os.path.join(path, d))), None)
    if qrels_dir is None:
        raise BenchmarkError(f"benchmark directory {path}: has corpus/ and queries/ but no qrels/ (or default/).")
    corpus_rows, query_rows, qrel_rows = (_read_hf_config(d) for d in (corpus_dir, queries_dir, qrels_dir))
    _columns(corpus_dir, corpus_rows, ("_id", "text"))
    _columns(queries_dir, query_rows, ("_id", "text"))
    _columns(qrels_dir, qrel_rows, ("query-id", "corpus-id", "score"))
    corpus = _unique(corpus_dir, [(n, str(r["_id"]), passage_text(r.get("title"), r["text"]))
                                  for n, r in enumerate(corpus_rows, 1)])
    queries = _unique(queries_dir, [(n, str(r["_id"]), r["text"]) for n, r in enumerate(query_rows, 1)])
    qrels: dict[str, dict[str, int]] = {}
    for r in qrel_rows:
        qrels.setdefault(str(r["query-id"]), {})[str(r["corpus-id"])] = int(r["score"])
    return corpus, queries, qrels
